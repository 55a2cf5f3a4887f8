/**
 * Front-proxy authentication, as extension API servers do it behind kube-apiserver's aggregator:
 * the identity in `X-Remote-User` / `X-Remote-Group` / `X-Remote-Extra-*` / `X-Remote-Uid` is
 * trusted only when the connection's client certificate chains to the request-header CA and its CN
 * is allowed. The headers are removed from every request afterwards, whoever sent them, so no
 * handler can mistake them for an identity.
 */
import type { X509Certificate } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import { subjectFields, verifyClientChain } from './x509.ts';
import type { AuthenticationResult, Authenticator } from './types.ts';

export interface RequestHeaderConfig {
  readonly caCertificates: readonly X509Certificate[];
  /** CNs the front proxy may present; empty means any certificate from the CA. */
  readonly allowedNames: readonly string[];
  readonly usernameHeaders: readonly string[];
  readonly groupHeaders: readonly string[];
  readonly extraHeaderPrefixes: readonly string[];
  readonly uidHeaders: readonly string[];
}

type Distinct = Record<string, string[] | undefined>;

function removeHeaders(headers: IncomingHttpHeaders, distinct: Distinct | undefined, c: RequestHeaderConfig): void {
  const exact = [...c.usernameHeaders, ...c.groupHeaders, ...c.uidHeaders].map((h) => h.toLowerCase());
  const prefixes = c.extraHeaderPrefixes.map((p) => p.toLowerCase());
  for (const store of [headers, distinct ?? {}] as Record<string, unknown>[]) {
    for (const name of Object.keys(store)) {
      if (exact.includes(name) || prefixes.some((p) => name.startsWith(p))) delete store[name];
    }
  }
}

function values(distinct: Distinct, headers: IncomingHttpHeaders, name: string): string[] {
  const d = distinct[name.toLowerCase()];
  if (d) return d;
  const v = headers[name.toLowerCase()];
  return v === undefined ? [] : Array.isArray(v) ? v : [v];
}

/** `X-Remote-Extra-Scopes%2Fv1` → `scopes/v1`: lower-cased, then percent-decoded, as kube does. */
function extraKey(headerName: string, prefix: string): string {
  const raw = headerName.slice(prefix.length).toLowerCase();
  try {
    return decodeURIComponent(raw);
  } catch {
    return raw;
  }
}

/**
 * @param config current configuration, or undefined while it is not known (then nothing is
 *   trusted); read on every request so a rotation applies at once.
 */
export function requestHeaderAuthenticator(config: () => RequestHeaderConfig | undefined): Authenticator {
  return {
    async authenticate(req): Promise<AuthenticationResult> {
      const c = config();
      if (!c) return { authenticated: false };
      const distinct = (req.headersDistinct ?? {}) as Distinct;
      try {
        const username = c.usernameHeaders.map((h) => values(distinct, req.headers, h)[0]).find((v) => v !== undefined && v !== '');
        if (!username) return { authenticated: false };
        const socket = req.socket;
        if (!socket || typeof socket.getPeerCertificate !== 'function') return { authenticated: false };
        const verified = verifyClientChain(socket, c.caCertificates);
        if (!verified.ok) {
          return { authenticated: false, reason: `request-header credentials ignored: ${verified.reason}` };
        }
        const cn = subjectFields(verified.leaf).get('CN')?.[0] ?? '';
        if (c.allowedNames.length > 0 && !c.allowedNames.includes(cn)) {
          return { authenticated: false, reason: `request-header credentials ignored: CN "${cn}" is not an allowed front proxy` };
        }
        const groups = c.groupHeaders.flatMap((h) => values(distinct, req.headers, h));
        const extra: Record<string, string[]> = {};
        for (const prefix of c.extraHeaderPrefixes.map((p) => p.toLowerCase())) {
          for (const [name, vals] of Object.entries(distinct)) {
            if (!name.startsWith(prefix) || !vals) continue;
            const key = extraKey(name, prefix);
            extra[key] = [...(extra[key] ?? []), ...vals];
          }
        }
        const uid = c.uidHeaders.map((h) => values(distinct, req.headers, h)[0]).find((v) => v !== undefined && v !== '');
        return {
          authenticated: true,
          user: { username, groups, ...(uid ? { uid } : {}), ...(Object.keys(extra).length > 0 ? { extra } : {}) },
        };
      } finally {
        removeHeaders(req.headers, distinct, c);
      }
    },
  };
}
