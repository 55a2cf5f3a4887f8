/**
 * Client-certificate authentication, as kube-apiserver's `--client-ca-file`: the TLS layer
 * verifies the chain against the client CA (the server asks for, but does not require, a
 * certificate, so health probes and other authenticators still work); the user is the subject's
 * CN and the groups are its O values.
 */
import type { TLSSocket } from 'node:tls';
import type { AuthenticationResult, Authenticator, AuthorizationDecision, Authorizer } from './types.ts';

export function clientCertificateAuthenticator(): Authenticator {
  // The certificate of a TLS connection never changes; decoding it once per connection instead of
  // once per request matters for keep-alive clients that write in bursts.
  const perConnection = new WeakMap<TLSSocket, AuthenticationResult>();
  return {
    async authenticate({ socket }) {
      if (!socket || typeof socket.getPeerCertificate !== 'function') return { authenticated: false };
      let result = perConnection.get(socket);
      if (!result) perConnection.set(socket, (result = fromCertificate(socket)));
      return result;
    },
  };
}

function fromCertificate(socket: TLSSocket): AuthenticationResult {
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
}

/** Stand-alone mode: every authenticated user may do everything (there is no cluster RBAC). */
export function allowAuthenticatedAuthorizer(): Authorizer {
  const allowed: AuthorizationDecision = { allowed: true, reason: '' };
  return { authorize: async () => allowed };
}
