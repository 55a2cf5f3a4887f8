/**
 * Client certificates checked against a chosen set of CAs. The TLS layer asks for a certificate
 * and trusts the union of every CA the server accepts (client CA and request-header CA), so each
 * authenticator must itself check that the chain ends at *its* CA: a front-proxy certificate is
 * not a user, and a user certificate may not assert front-proxy headers.
 */
import { X509Certificate } from 'node:crypto';
import type { DetailedPeerCertificate, TLSSocket } from 'node:tls';
import type { AuthenticationResult, Authenticator } from './types.ts';

const CLIENT_AUTH_OID = '1.3.6.1.5.5.7.3.2';

/** Parses every certificate of a PEM bundle (a CA file may hold several during a rotation). */
export function parseCertificateBundle(pem: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((b) => new X509Certificate(b));
}

/** The peer's chain, leaf first, as sent in the handshake. */
function peerChain(socket: TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = [];
  let detailed: DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
  const seen = new Set<string>();
  while (detailed && detailed.raw && !seen.has(detailed.fingerprint256)) {
    seen.add(detailed.fingerprint256);
    chain.push(new X509Certificate(detailed.raw));
    detailed = detailed.issuerCertificate;
  }
  return chain;
}

function currentlyValid(cert: X509Certificate, now: number): boolean {
  return Date.parse(cert.validFrom) <= now && now <= Date.parse(cert.validTo);
}

const signedBy = (cert: X509Certificate, issuer: X509Certificate) => cert.checkIssued(issuer) && cert.verify(issuer.publicKey);

/**
 * The verified leaf certificate when the peer's chain leads to one of `roots` (directly or
 * through intermediates the peer sent), every certificate is in its validity period, and the
 * leaf may be used for client authentication; otherwise a reason.
 */
export function verifyClientChain(
  socket: TLSSocket,
  roots: readonly X509Certificate[],
  now = Date.now(),
): { ok: true; leaf: X509Certificate } | { ok: false; reason: string } {
  const chain = peerChain(socket);
  const leaf = chain[0];
  if (!leaf) return { ok: false, reason: 'no client certificate' };
  if (roots.length === 0) return { ok: false, reason: 'no CA is configured for client certificates' };
  const usages = leaf.keyUsage;
  if (usages && usages.length > 0 && !usages.includes(CLIENT_AUTH_OID)) {
    return { ok: false, reason: 'the certificate is not for client authentication' };
  }
  let cert = leaf;
  for (let depth = 0; depth < 5; depth++) {
    if (!currentlyValid(cert, now)) return { ok: false, reason: `certificate "${cert.subject.replace(/\n/g, ', ')}" is expired or not yet valid` };
    if (roots.some((r) => signedBy(cert, r) && currentlyValid(r, now))) return { ok: true, leaf };
    const next = chain.find((c) => c !== cert && signedBy(cert, c) && c.ca);
    if (!next) break;
    cert = next;
  }
  return { ok: false, reason: 'the certificate is not signed by a trusted CA' };
}

/** Subject fields of a certificate (`CN`, `O`, ...), each with all its values. */
export function subjectFields(cert: X509Certificate): Map<string, string[]> {
  const fields = new Map<string, string[]>();
  for (const line of cert.subject.split('\n')) {
    const eq = line.indexOf('=');
    if (eq <= 0) continue;
    const k = line.slice(0, eq);
    fields.set(k, [...(fields.get(k) ?? []), line.slice(eq + 1)]);
  }
  return fields;
}

/**
 * Client-certificate authentication as kube-apiserver's `--client-ca-file`: the user is the CN,
 * the groups are the O values. `roots()` is read on every new connection, so a rotated CA
 * applies without a restart; the result is kept per connection (its certificate cannot change).
 */
export function x509Authenticator(roots: () => readonly X509Certificate[]): Authenticator {
  const perConnection = new WeakMap<TLSSocket, { roots: readonly X509Certificate[]; result: AuthenticationResult }>();
  return {
    async authenticate({ socket }) {
      if (!socket || typeof socket.getPeerCertificate !== 'function') return { authenticated: false };
      const current = roots();
      const cached = perConnection.get(socket);
      if (cached && cached.roots === current) return cached.result;
      const result = fromCertificate(socket, current);
      perConnection.set(socket, { roots: current, result });
      return result;
    },
  };
}

function fromCertificate(socket: TLSSocket, roots: readonly X509Certificate[]): AuthenticationResult {
  const cert = socket.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return { authenticated: false };
  const verified = verifyClientChain(socket, roots);
  if (!verified.ok) return { authenticated: false, reason: `the client certificate was not accepted: ${verified.reason}` };
  const subject = subjectFields(verified.leaf);
  const username = subject.get('CN')?.[0];
  if (!username) return { authenticated: false, reason: 'the client certificate has no common name' };
  const groups = [...(subject.get('O') ?? []), 'system:authenticated'];
  return { authenticated: true, user: { username, groups } };
}
