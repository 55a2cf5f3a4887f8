/**
 * Client-certificate authentication, as kube-apiserver's `--client-ca-file`: the TLS layer
 * verifies the chain against the client CA (the server asks for, but does not require, a
 * certificate, so health probes and other authenticators still work); the user is the subject's
 * CN and the groups are its O values.
 */
import type { Authenticator, AuthorizationDecision, Authorizer } from './types.ts';

export function clientCertificateAuthenticator(): Authenticator {
  return {
    async authenticate({ socket }) {
      if (!socket || typeof socket.getPeerCertificate !== 'function') return { authenticated: false };
      const cert = socket.getPeerCertificate();
      if (!cert || Object.keys(cert).length === 0) return { authenticated: false };
      if (!socket.authorized) {
        return {
          authenticated: false,
          reason: `the client certificate was not accepted (${String(socket.authorizationError ?? 'unknown CA')})`,
        };
      }
      const subject = cert.subject as unknown as Record<string, string | string[] | undefined>;
      const cn = subject['CN'];
      const username = Array.isArray(cn) ? cn[0] : cn;
      if (!username) return { authenticated: false, reason: 'the client certificate has no common name' };
      const o = subject['O'];
      const groups = [...(o === undefined ? [] : Array.isArray(o) ? o : [o]), 'system:authenticated'];
      return { authenticated: true, user: { username, groups } };
    },
  };
}

/** Stand-alone mode: every authenticated user may do everything (there is no cluster RBAC). */
export function allowAuthenticatedAuthorizer(): Authorizer {
  const allowed: AuthorizationDecision = { allowed: true, reason: '' };
  return { authorize: async () => allowed };
}
