/**
 * Front-proxy and client-certificate authentication over real TLS connections.
 */
import { X509Certificate } from 'node:crypto';
import { createServer, request } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import t from 'tap';
import { generateCa, issueCertificate, issueClientCertificate, type CertificateAndKey } from '../../src/certs/dev-pki.ts';
import { requestHeaderAuthenticator, type RequestHeaderConfig } from '../../src/auth/request-header.ts';
import { unionAuthenticator } from '../../src/auth/types.ts';
import { x509Authenticator } from '../../src/auth/x509.ts';

const clientCa = generateCa('cluster-ca');
const frontProxyCa = generateCa('front-proxy-ca');
const otherCa = generateCa('front-proxy-ca'); // same name, different key: must not be trusted
const serving = issueCertificate({ issuer: clientCa, commonName: 'server', sans: ['127.0.0.1'], extKeyUsage: ['serverAuth'] });
const proxy = issueClientCertificate({ caCertPem: frontProxyCa.certPem, caKeyPem: frontProxyCa.keyPem, commonName: 'front-proxy-client' });
const wrongCn = issueClientCertificate({ caCertPem: frontProxyCa.certPem, caKeyPem: frontProxyCa.keyPem, commonName: 'someone-else' });
const forged = issueClientCertificate({ caCertPem: otherCa.certPem, caKeyPem: otherCa.keyPem, commonName: 'front-proxy-client' });
const bob = issueClientCertificate({ caCertPem: clientCa.certPem, caKeyPem: clientCa.keyPem, commonName: 'bob', organizations: ['devs'] });

const config: RequestHeaderConfig = {
  caCertificates: [new X509Certificate(frontProxyCa.certPem)],
  allowedNames: ['front-proxy-client'],
  usernameHeaders: ['X-Remote-User'],
  groupHeaders: ['X-Remote-Group'],
  extraHeaderPrefixes: ['X-Remote-Extra-'],
  uidHeaders: ['X-Remote-Uid'],
};
const clientRoots = [new X509Certificate(clientCa.certPem)];
const authenticator = unionAuthenticator(requestHeaderAuthenticator(() => config), x509Authenticator(() => clientRoots));

let port = 0;
const server = createServer(
  { cert: serving.certPem, key: serving.keyPem, ca: [clientCa.certPem, frontProxyCa.certPem], requestCert: true, rejectUnauthorized: false },
  (req, res) => {
    void authenticator.authenticate({ headers: req.headers, headersDistinct: req.headersDistinct, socket: req.socket as TLSSocket }).then((r) => {
      const leftover = Object.keys(req.headers).filter((h) => h.startsWith('x-remote-'));
      res.writeHead(r.authenticated ? 200 : 401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ...r, leftover }));
    });
  },
);
t.before(() => new Promise<void>((r) => server.listen(0, '127.0.0.1', () => { port = (server.address() as AddressInfo).port; r(); })));
t.teardown(() => new Promise<void>((r) => server.close(() => r())));

const identityHeaders: [string, string][] = [
  ['X-Remote-User', 'alice'],
  ['X-Remote-Group', 'platform'],
  ['X-Remote-Group', 'ops'],
  ['X-Remote-Extra-Scopes%2Fv1', 'read'],
  ['X-Remote-Extra-Scopes%2Fv1', 'write'],
  ['X-Remote-Uid', 'uid-123'],
];

function call(cert: CertificateAndKey | undefined): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = request(
      { host: '127.0.0.1', port, path: '/', ca: clientCa.certPem, agent: false, ...(cert ? { cert: cert.certPem, key: cert.keyPem } : {}) },
      (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }));
      },
    );
    req.on('error', reject);
    // Repeated headers as separate lines, as the aggregator sends them.
    const flat: string[] = [];
    for (const [k, v] of identityHeaders) flat.push(k, v);
    for (let i = 0; i < flat.length; i += 2) req.appendHeader(flat[i]!, flat[i + 1]!);
    req.end();
  });
}

t.test('front-proxy headers from a request-header CA certificate with an allowed CN are the user', async (t) => {
  const r = await call(proxy);
  t.equal(r.status, 200);
  t.same(r.body.user, {
    username: 'alice',
    groups: ['platform', 'ops', 'system:authenticated'],
    uid: 'uid-123',
    extra: { 'scopes/v1': ['read', 'write'] },
  });
  t.same(r.body.leftover, [], 'the identity headers are removed after use');
  t.equal(r.body.user.groups.at(-1), 'system:authenticated', 'every authenticated user is in system:authenticated');
});

t.test('the same headers with a certificate from another CA are ignored: 401', async (t) => {
  const r = await call(forged);
  t.equal(r.status, 401);
  t.match(r.body.reason, /not signed by a trusted CA/);
  t.same(r.body.leftover, [], 'and removed');
});

t.test('the same headers with a disallowed CN are ignored: 401', async (t) => {
  const r = await call(wrongCn);
  t.equal(r.status, 401);
  t.match(r.body.reason, /CN "someone-else" is not an allowed front proxy/);
});

t.test('a user certificate cannot assert front-proxy headers: it is its own user', async (t) => {
  const r = await call(bob);
  t.equal(r.status, 200);
  t.same(r.body.user, { username: 'bob', groups: ['devs', 'system:authenticated'] });
  t.same(r.body.leftover, []);
});

t.test('no certificate: nothing is trusted', async (t) => {
  const r = await call(undefined);
  t.equal(r.status, 401);
});
