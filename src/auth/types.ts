/**
 * Authentication and authorization seams. Stand-alone mode wires a client-certificate
 * authenticator and an "authenticated users may do anything" authorizer; a server behind
 * kube-apiserver's aggregator wires front-proxy headers, TokenReview and SubjectAccessReview.
 */
import type { IncomingHttpHeaders } from 'node:http';
import type { TLSSocket } from 'node:tls';

export interface UserInfo {
  readonly username: string;
  readonly uid?: string;
  readonly groups: readonly string[];
  readonly extra?: Readonly<Record<string, readonly string[]>>;
}

export interface AuthenticationRequest {
  readonly headers: IncomingHttpHeaders;
  /** Every header with all its values (repeated headers such as X-Remote-Group are not joined). */
  readonly headersDistinct?: Readonly<Record<string, string[] | undefined>>;
  readonly socket: TLSSocket | undefined;
}

export type AuthenticationResult =
  | { readonly authenticated: true; readonly user: UserInfo }
  /** No credentials this authenticator understands: the next one may try. */
  | { readonly authenticated: false; readonly reason?: string };

export interface Authenticator {
  authenticate(req: AuthenticationRequest): Promise<AuthenticationResult>;
}

/** The attributes kube-apiserver puts in a SubjectAccessReview. */
export interface RequestAttributes {
  readonly user: UserInfo;
  readonly verb: string;
  readonly isResourceRequest: boolean;
  readonly path: string;
  readonly apiGroup?: string;
  readonly apiVersion?: string;
  readonly resource?: string;
  readonly subresource?: string;
  readonly name?: string;
  readonly namespace?: string;
}

export interface AuthorizationDecision {
  readonly allowed: boolean;
  /** Why not, in words a person can act on (shown in the 403). */
  readonly reason: string;
}

export interface Authorizer {
  authorize(attrs: RequestAttributes): Promise<AuthorizationDecision>;
}

export const AUTHENTICATED_GROUP = 'system:authenticated';

/**
 * Tries each authenticator in order; the first that recognises the credentials decides. Every
 * authenticated user is in `system:authenticated`, as kube-apiserver adds it: RBAC's discovery
 * and OpenAPI rules are bound to that group, and the aggregator's own requests rely on it.
 */
export function unionAuthenticator(...authenticators: readonly Authenticator[]): Authenticator {
  return {
    async authenticate(req) {
      const reasons: string[] = [];
      for (const a of authenticators) {
        const r = await a.authenticate(req);
        if (r.authenticated) {
          if (r.user.groups.includes(AUTHENTICATED_GROUP)) return r;
          return { authenticated: true, user: { ...r.user, groups: [...r.user.groups, AUTHENTICATED_GROUP] } };
        }
        if (r.reason) reasons.push(r.reason);
      }
      return reasons.length > 0 ? { authenticated: false, reason: reasons.join('; ') } : { authenticated: false };
    },
  };
}
