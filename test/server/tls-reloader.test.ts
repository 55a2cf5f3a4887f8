/**
 * A certificate rotated on disk is served to the next new connection, without a restart and
 * without dropping open connections.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { Agent, createServer, request } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { pino } from 'pino';
import t from 'tap';
import { generateCa, issueCertificate } from '../../src/certs/dev-pki.ts';
import { startTlsReloader } from '../../src/server/tls-reloader.ts';

t.test('a rotated serving certificate reaches new connections; open ones stay up', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-tls-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const ca = generateCa('reload-ca');
  const issue = () => issueCertificate({ issuer: ca, commonName: 'server', sans: ['127.0.0.1'], extKeyUsage: ['serverAuth'] });
  const first = issue();
  const certFile = join(dir, 'tls.crt');
  const keyFile = join(dir, 'tls.key');
  await writeFile(certFile, first.certPem);
  await writeFile(keyFile, first.keyPem);

  const server = createServer({ cert: first.certPem, key: first.keyPem }, (_req, res) => res.end('ok'));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
  const port = (server.address() as AddressInfo).port;
  const reloader = startTlsReloader({ server, certFile, keyFile, clientCas: () => [], intervalMs: 50, logger: pino({ level: 'silent' }) });
  t.teardown(() => reloader.stop());
  t.equal(await reloader.check(), false, 'the first check only records the current pair');

  const fingerprint = (pem: string) => createHash('sha256').update(Buffer.from(pem.replace(/-----[^-]+-----|\s/g, ''), 'base64')).digest('hex');
  const keepAlive = new Agent({ keepAlive: true, maxSockets: 1, ca: ca.certPem });
  t.teardown(() => keepAlive.destroy());
  const get = (agent: Agent | false) =>
    new Promise<{ fp: string; socket: TLSSocket }>((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, path: '/', ca: ca.certPem, agent }, (res) => {
        const socket = res.socket as TLSSocket;
        const raw = socket.getPeerCertificate().raw;
        res.resume();
        res.on('end', () => resolve({ fp: createHash('sha256').update(raw).digest('hex'), socket }));
      });
      req.on('error', reject);
      req.end();
    });

  const before = await get(keepAlive);
  t.equal(before.fp, fingerprint(first.certPem));

  // Rotate as a Secret volume does: new files swapped in by rename.
  const second = issue();
  await writeFile(join(dir, 'tls.crt.new'), second.certPem);
  await writeFile(join(dir, 'tls.key.new'), second.keyPem);
  await rename(join(dir, 'tls.key.new'), keyFile);
  await rename(join(dir, 'tls.crt.new'), certFile);
  const deadline = Date.now() + 5000;
  let fresh = await get(false);
  while (fresh.fp !== fingerprint(second.certPem) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    fresh = await get(false);
  }
  t.equal(fresh.fp, fingerprint(second.certPem), 'a new connection gets the rotated certificate');
  const reused = await get(keepAlive);
  t.equal(reused.socket, before.socket, 'the open keep-alive connection was not dropped');
  t.equal(reused.fp, fingerprint(first.certPem), 'and keeps the certificate it was opened with');
});

t.test('a mismatched pair on disk is not installed', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-tls-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  const ca = generateCa('reload-ca');
  const a = issueCertificate({ issuer: ca, commonName: 'a', sans: ['127.0.0.1'] });
  const b = issueCertificate({ issuer: ca, commonName: 'b', sans: ['127.0.0.1'] });
  await writeFile(join(dir, 'tls.crt'), a.certPem);
  await writeFile(join(dir, 'tls.key'), b.keyPem);
  let installed = 0;
  const reloader = startTlsReloader({
    server: { setSecureContext: () => void installed++ },
    certFile: join(dir, 'tls.crt'),
    keyFile: join(dir, 'tls.key'),
    clientCas: () => [],
    intervalMs: 60_000,
    logger: pino({ level: 'silent' }),
  });
  t.teardown(() => reloader.stop());
  t.equal(await reloader.check(), false);
  t.equal(installed, 0, 'the server keeps its current certificate');
});
