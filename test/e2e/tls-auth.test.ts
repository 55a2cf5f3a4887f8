/**
 * Stand-alone authentication over real TLS: client certificates from the server's own CA are
 * users; no certificate, or one from another CA, is 401; health needs nothing.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { join } from 'node:path';
import t from 'tap';
import { generateCa, issueClientCertificate } from '../../src/certs/dev-pki.ts';
import { startTestServer, type TestServer } from '../helpers/server.ts';

let server: TestServer;
t.before(async () => {
  server = await startTestServer();
});
t.teardown(async () => {
  await server?.stop();
});

function get(path: string, client?: { certPem: string; keyPem: string }): Promise<{ status: number; body: string }> {
  return readFile(join(server.certDir, 'ca.crt')).then(
    (ca) =>
      new Promise((resolve, reject) => {
        const req = request(
          { host: '127.0.0.1', port: server.port, path, ca, agent: false, ...(client ? { cert: client.certPem, key: client.keyPem } : {}) },
          (res) => {
            let body = '';
            res.on('data', (d: Buffer) => (body += d.toString()));
            res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
          },
        );
        req.on('error', reject);
        req.end();
      }),
  );
}

t.test('health endpoints answer without a client certificate', async (t) => {
  for (const p of ['/healthz', '/livez', '/readyz']) t.equal((await get(p)).status, 200, p);
});

t.test('no client certificate is 401 with a Status saying what is needed', async (t) => {
  const r = await get('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations');
  t.equal(r.status, 401);
  t.match(JSON.parse(r.body), { kind: 'Status', reason: 'Unauthorized', message: /client certificate/ });
});

t.test('a certificate from another CA is not accepted', async (t) => {
  const other = generateCa('someone-else');
  const cert = issueClientCertificate({ caCertPem: other.certPem, caKeyPem: other.keyPem, commonName: 'mallory', organizations: ['system:masters'] });
  const r = await get('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', cert);
  t.equal(r.status, 401);
  t.match(JSON.parse(r.body).message, /not accepted/);
});

t.test('a certificate from the server CA is served as its user', async (t) => {
  const [caCertPem, caKeyPem] = await Promise.all([
    readFile(join(server.certDir, 'ca.crt'), 'utf8'),
    readFile(join(server.certDir, 'ca.key'), 'utf8'),
  ]);
  const cert = issueClientCertificate({ caCertPem, caKeyPem, commonName: 'jane', organizations: ['platform'] });
  const r = await get('/apis/kmm.sigs.x-k8s.io/v1beta2/preflightvalidations', cert);
  t.equal(r.status, 200);
  t.equal(JSON.parse(r.body).kind, 'PreflightValidationList');
});
