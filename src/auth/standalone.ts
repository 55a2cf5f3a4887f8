/**
 * Authorization of stand-alone mode: there is no cluster RBAC to ask, so every user with a client
 * certificate from the server's own CA may do everything (the development PKI's admin certificate
 * is such a user).
 */
import type { AuthorizationDecision, Authorizer } from './types.ts';

export function allowAuthenticatedAuthorizer(): Authorizer {
  const allowed: AuthorizationDecision = { allowed: true, reason: '' };
  return { authorize: async () => allowed };
}
