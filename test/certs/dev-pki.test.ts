import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { request, createServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import t from 'tap';
import { parse as parseYaml } from 'yaml';
import {
  ADMIN_COMMON_NAME,
  DEFAULT_SERVER_SANS,
  devPkiPaths,
  ensureDevPki,
  generateCa,
  generateDevPki,
  issueClientCertificate,
} from '../../src/certs/dev-pki.ts';
import type { CertificateAndKey, DevPkiPaths } from '../../src/certs/dev-pki.ts';

const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';
const SERVER_URL = 'https://127.0.0.1:6443';
const ALL_FILES = ['ca.crt', 'ca.key', 'server.crt', 'server.key', 'admin.crt', 'admin.key', 'kubeconfig'];
const GENERATE_CLI = fileURLToPath(new URL('../../certs/generate.ts', import.meta.url));

interface Kubeconfig {
  apiVersion: string;
  kind: string;
  clusters: { name: string; cluster: Record<string, string> }[];
  users: { name: string; user: Record<string, string> }[];
  contexts: { name: string; context: { cluster: string; user: string } }[];
  'current-context': string;
}

const pem = (path: string): Promise<string> => readFile(path, 'utf8');
const cert = async (path: string): Promise<X509Certificate> => new X509Certificate(await readFile(path));
const b64 = (text: string): string => Buffer.from(text, 'utf8').toString('base64');

async function snapshot(dir: string): Promise<Map<string, { content: string; mtimeMs: number }>> {
  const result = new Map<string, { content: string; mtimeMs: number }>();
  for (const name of ALL_FILES) {
    const path = `${dir}/${name}`;
    result.set(name, { content: await readFile(path, 'utf8'), mtimeMs: (await stat(path)).mtimeMs });
  }
  return result;
}

t.test('generateDevPki', async (t) => {
  const dir = t.testdir();
  const started = performance.now();
  const paths = await generateDevPki({
    dir,
    serverUrl: SERVER_URL,
    extraSans: ['dev.example.com', '10.1.2.3', 'fd00::10'],
  });
  const elapsed = performance.now() - started;
  t.comment(`generateDevPki took ${elapsed.toFixed(0)} ms`);
  t.ok(elapsed < 2000, 'generates the PKI well under 2 s');
  t.same(paths, devPkiPaths(dir), 'returns the paths of all files');
  t.same((await readdir(dir)).sort(), [...ALL_FILES].sort(), 'writes exactly the PKI files, no temporary leftovers');

  const ca = await cert(paths.caCert);
  const server = await cert(paths.serverCert);
  const admin = await cert(paths.adminCert);

  t.test('CA', async (t) => {
    t.equal(ca.subject, 'CN=kmm-preflight-dev-ca');
    t.ok(ca.ca, 'basicConstraints CA:true');
    t.ok(ca.verify(ca.publicKey), 'self-signed');
    t.ok(ca.checkIssued(ca), 'issuer is itself');
    const days = (Date.parse(ca.validTo) - Date.parse(ca.validFrom)) / 86_400_000;
    t.ok(Math.abs(days - 365) < 0.01, `valid 365 days (${days})`);
  });

  t.test('serving certificate', async (t) => {
    t.ok(server.verify(ca.publicKey), 'signed by the CA');
    t.ok(server.checkIssued(ca), 'issued by the CA');
    t.notOk(server.ca, 'not a CA');
    t.equal(server.subject, 'CN=kmm-preflight');
    t.same(server.keyUsage, [SERVER_AUTH], 'extKeyUsage serverAuth only');
    for (const san of DEFAULT_SERVER_SANS.filter((s) => !s.includes(':') && !/^\d/.test(s))) {
      t.equal(server.checkHost(san, { subject: 'never' }), san, `DNS SAN ${san}`);
    }
    t.equal(server.checkHost('dev.example.com', { subject: 'never' }), 'dev.example.com', 'extra DNS SAN');
    t.equal(server.checkIP('127.0.0.1'), '127.0.0.1', 'IP SAN 127.0.0.1');
    t.equal(server.checkIP('::1'), '::1', 'IP SAN ::1');
    t.equal(server.checkIP('10.1.2.3'), '10.1.2.3', 'extra IP SAN');
    t.equal(server.checkIP('fd00::10'), 'fd00::10', 'extra IPv6 SAN');
    t.equal(server.checkHost('10.1.2.3', { subject: 'never' }), undefined, 'an IP literal is not a DNS SAN');
    t.equal(server.checkHost('example.org'), undefined, 'no other host');
    t.equal(server.checkIP('127.0.0.2'), undefined, 'no other IP');
    t.equal(
      server.subjectAltName,
      'DNS:localhost, DNS:kmm-preflight, DNS:kmm-preflight.kmm-preflight, DNS:kmm-preflight.kmm-preflight.svc, ' +
        'DNS:kmm-preflight.kmm-preflight.svc.cluster.local, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, ' +
        'DNS:dev.example.com, IP Address:10.1.2.3, IP Address:FD00:0:0:0:0:0:0:10',
      'exactly the expected SANs',
    );
  });

  t.test('admin certificate', async (t) => {
    t.ok(admin.verify(ca.publicKey), 'signed by the CA');
    t.equal(admin.subject, 'CN=kmm-preflight-admin\nO=system:masters');
    t.same(admin.keyUsage, [CLIENT_AUTH], 'extKeyUsage clientAuth only');
    t.notOk(admin.ca, 'not a CA');
  });

  t.test('serial numbers and validity', async (t) => {
    const serials = [ca, server, admin].map((c) => c.serialNumber);
    for (const serial of serials) {
      t.match(serial, /^[0-9A-F]{32}$/, `16-byte serial ${serial}`);
      t.ok(Number.parseInt(serial.slice(0, 2), 16) < 0x80, 'positive');
    }
    t.equal(new Set(serials).size, 3, 'distinct');
    for (const c of [ca, server, admin]) {
      const backdated = Date.now() - Date.parse(c.validFrom);
      // validFrom has one-second resolution, so allow for truncation and the test's own runtime.
      t.ok(backdated >= 59_000 && backdated < 120_000, `notBefore a minute in the past (${backdated} ms)`);
    }
  });

  t.test('file modes', async (t) => {
    for (const path of [paths.caKey, paths.serverKey, paths.adminKey, paths.kubeconfig]) {
      t.equal((await stat(path)).mode & 0o777, 0o600, `${path} is 0600`);
    }
    for (const path of [paths.caCert, paths.serverCert, paths.adminCert]) {
      t.equal((await stat(path)).mode & 0o022, 0, `${path} is not writable by group or others`);
    }
  });

  t.test('kubeconfig', async (t) => {
    const config = parseYaml(await pem(paths.kubeconfig)) as Kubeconfig;
    t.equal(config.apiVersion, 'v1');
    t.equal(config.kind, 'Config');
    t.equal(config['current-context'], 'kmm-preflight');
    t.same(config.contexts, [{ name: 'kmm-preflight', context: { cluster: 'kmm-preflight', user: ADMIN_COMMON_NAME } }]);
    t.equal(config.clusters.length, 1);
    t.equal(config.clusters[0]?.name, 'kmm-preflight');
    t.equal(config.clusters[0]?.cluster['server'], SERVER_URL);
    t.equal(config.clusters[0]?.cluster['certificate-authority-data'], b64(await pem(paths.caCert)));
    t.equal(config.users.length, 1);
    t.equal(config.users[0]?.name, ADMIN_COMMON_NAME);
    t.equal(config.users[0]?.user['client-certificate-data'], b64(await pem(paths.adminCert)));
    t.equal(config.users[0]?.user['client-key-data'], b64(await pem(paths.adminKey)));
  });

  t.test('regenerating replaces every file', async (t) => {
    const before = await snapshot(dir);
    await generateDevPki({ dir, serverUrl: SERVER_URL });
    const after = await snapshot(dir);
    for (const name of ALL_FILES) {
      t.not(after.get(name)?.content, before.get(name)?.content, `${name} replaced`);
    }
    t.same((await readdir(dir)).sort(), [...ALL_FILES].sort(), 'no temporary leftovers');
  });
});

t.test('generateDevPki creates a missing directory', async (t) => {
  const dir = `${t.testdir()}/nested/certs`;
  await generateDevPki({ dir, serverUrl: SERVER_URL, days: 2 });
  t.equal((await stat(dir)).mode & 0o077, 0, 'directory is private');
  const server = await cert(`${dir}/server.crt`);
  const days = (Date.parse(server.validTo) - Date.parse(server.validFrom)) / 86_400_000;
  t.ok(Math.abs(days - 2 - 1 / 1440) < 0.01, `days honoured (${days})`);
});

t.test('invalid options are rejected before anything is written', async (t) => {
  const dir = `${t.testdir()}/out`;
  await t.rejects(generateDevPki({ dir, serverUrl: 'http://127.0.0.1:6443' }), /https/);
  await t.rejects(generateDevPki({ dir, serverUrl: 'not a url' }), /invalid server URL/);
  await t.rejects(generateDevPki({ dir, serverUrl: SERVER_URL, extraSans: ['bad name'] }), /invalid SAN/);
  await t.rejects(generateDevPki({ dir, serverUrl: SERVER_URL, extraSans: ['fe80::1%eth0'] }), /zone/);
  await t.rejects(generateDevPki({ dir, serverUrl: SERVER_URL, days: 0 }), /days/);
  await t.rejects(ensureDevPki({ dir, serverUrl: SERVER_URL, days: -1 }), /days/);
  await t.rejects(stat(dir), { code: 'ENOENT' }, 'nothing written');
});

t.test('ensureDevPki', async (t) => {
  const dir = t.testdir();
  const first = await ensureDevPki({ dir, serverUrl: SERVER_URL });
  t.equal(first.created, true, 'creates a missing PKI');
  t.same(first.paths, devPkiPaths(dir));
  const original = await snapshot(dir);

  t.test('keeps an existing PKI untouched', async (t) => {
    const again = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.same(again, { created: false, kubeconfigUpdated: false, paths: devPkiPaths(dir) });
    t.same(await snapshot(dir), original, 'contents and mtimes unchanged');
  });

  t.test('rewrites only the kubeconfig when the server URL changes', async (t) => {
    const moved = await ensureDevPki({ dir, serverUrl: 'https://localhost:8443' });
    t.same(moved, { created: false, kubeconfigUpdated: true, paths: devPkiPaths(dir) });
    const now = await snapshot(dir);
    for (const name of ALL_FILES.filter((n) => n !== 'kubeconfig')) {
      t.same(now.get(name), original.get(name), `${name} unchanged`);
    }
    const config = parseYaml(now.get('kubeconfig')?.content ?? '') as Kubeconfig;
    t.equal(config.clusters[0]?.cluster['server'], 'https://localhost:8443', 'new server URL');
    t.equal(config.clusters[0]?.cluster['certificate-authority-data'], b64(original.get('ca.crt')?.content ?? ''));
    t.equal((await stat(`${dir}/kubeconfig`)).mode & 0o777, 0o600, 'still 0600');
    t.same((await readdir(dir)).sort(), [...ALL_FILES].sort(), 'no temporary leftovers');

    const back = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.equal(back.kubeconfigUpdated, true, 'and back');
    t.equal((await pem(`${dir}/kubeconfig`)), original.get('kubeconfig')?.content, 'identical to the original');
  });

  t.test('recreates a missing kubeconfig without touching the CA', async (t) => {
    await rm(`${dir}/kubeconfig`);
    const result = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.same(result, { created: false, kubeconfigUpdated: true, paths: devPkiPaths(dir) });
    t.same((await snapshot(dir)).get('ca.crt'), original.get('ca.crt'));
  });

  t.test('regenerates when a certificate or key is missing', async (t) => {
    await rm(`${dir}/admin.key`);
    const result = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.equal(result.created, true);
    t.match(result.reason, /admin\.key is missing/);
    t.not(await pem(`${dir}/ca.crt`), original.get('ca.crt')?.content, 'new CA');
  });

  t.test('regenerates a mixed set left by an interrupted run', async (t) => {
    const caBefore = await pem(`${dir}/ca.crt`);
    const foreign = generateCa('kmm-preflight-dev-ca');
    await writeFile(`${dir}/ca.crt`, foreign.certPem);
    await writeFile(`${dir}/ca.key`, foreign.keyPem, { mode: 0o600 });
    const result = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.equal(result.created, true);
    t.match(result.reason, /server\.crt is not signed by/);
    const ca = await cert(`${dir}/ca.crt`);
    t.ok((await cert(`${dir}/server.crt`)).verify(ca.publicKey), 'consistent again');
    t.not(ca.toString(), caBefore);
  });

  t.test('regenerates when a certificate does not match its key', async (t) => {
    const ca = await pem(`${dir}/ca.crt`);
    const other = issueClientCertificate({
      caCertPem: ca,
      caKeyPem: await pem(`${dir}/ca.key`),
      commonName: ADMIN_COMMON_NAME,
      organizations: ['system:masters'],
    });
    await writeFile(`${dir}/admin.crt`, other.certPem);
    const result = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.equal(result.created, true);
    t.match(result.reason, /admin\.crt does not match its private key/);
  });

  t.test('regenerates an unparseable file', async (t) => {
    await writeFile(`${dir}/server.crt`, 'garbage');
    const result = await ensureDevPki({ dir, serverUrl: SERVER_URL });
    t.equal(result.created, true);
    t.match(result.reason, /cannot be parsed/);
  });
});

t.test('issueClientCertificate and generateCa', async (t) => {
  const ca = generateCa('test-ca');
  const caCert = new X509Certificate(ca.certPem);
  t.equal(caCert.subject, 'CN=test-ca');
  t.ok(caCert.ca);
  const user = issueClientCertificate({
    caCertPem: ca.certPem,
    caKeyPem: ca.keyPem,
    commonName: 'alice',
    organizations: ['dev', 'ops'],
    days: 1,
  });
  const userCert = new X509Certificate(user.certPem);
  t.ok(userCert.verify(caCert.publicKey));
  t.equal(userCert.subject, 'CN=alice\nO=dev\nO=ops');
  t.same(userCert.keyUsage, [CLIENT_AUTH]);
  t.match(user.keyPem, /^-----BEGIN PRIVATE KEY-----/);
  const noGroups = new X509Certificate(
    issueClientCertificate({ caCertPem: ca.certPem, caKeyPem: ca.keyPem, commonName: 'bob' }).certPem,
  );
  t.equal(noGroups.subject, 'CN=bob');
});

t.test('mutual TLS handshake with the generated PKI', async (t) => {
  const dir = t.testdir();
  const paths: DevPkiPaths = await generateDevPki({ dir, serverUrl: SERVER_URL });
  const caPem = await pem(paths.caCert);
  const admin: CertificateAndKey = { certPem: await pem(paths.adminCert), keyPem: await pem(paths.adminKey) };

  const server = createServer(
    {
      cert: await pem(paths.serverCert),
      key: await pem(paths.serverKey),
      ca: caPem,
      requestCert: true,
      // Let unauthorized clients through so the test can observe `authorized: false`, as the
      // server does when it falls back to other authenticators.
      rejectUnauthorized: false,
    },
    (req, res) => {
      const socket = req.socket as TLSSocket;
      const peer = socket.getPeerCertificate();
      res.setHeader('content-type', 'application/json');
      res.end(
        JSON.stringify({
          authorized: socket.authorized,
          authorizationError: socket.authorizationError?.toString() ?? null,
          subject: peer && Object.keys(peer).length > 0 ? peer.subject : null,
        }),
      );
    },
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const { port } = server.address() as AddressInfo;

  interface Observed {
    authorized: boolean;
    authorizationError: string | null;
    subject: Record<string, string | string[]> | null;
  }
  const call = (client: Partial<CertificateAndKey>, servername?: string): Promise<Observed> =>
    new Promise((resolve, reject) => {
      const req = request(
        {
          host: '127.0.0.1',
          port,
          path: '/',
          ca: caPem,
          cert: client.certPem,
          key: client.keyPem,
          agent: false,
          ...(servername ? { servername } : {}),
        },
        (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => (body += chunk));
          res.on('end', () => resolve(JSON.parse(body) as Observed));
        },
      );
      req.on('error', reject);
      req.end();
    });

  t.test('the admin certificate is authorized', async (t) => {
    const observed = await call(admin);
    t.equal(observed.authorized, true);
    t.equal(observed.authorizationError, null);
    t.match(observed.subject, { CN: 'kmm-preflight-admin', O: 'system:masters' });
  });

  t.test('the client verifies the server by its service DNS name', async (t) => {
    const observed = await call(admin, 'kmm-preflight.kmm-preflight.svc');
    t.equal(observed.authorized, true);
  });

  t.test('a user issued by the dev CA with other groups is authorized', async (t) => {
    const user = issueClientCertificate({
      caCertPem: caPem,
      caKeyPem: await pem(paths.caKey),
      commonName: 'alice',
      organizations: ['dev', 'ops'],
    });
    const observed = await call(user);
    t.equal(observed.authorized, true);
    t.same(observed.subject, { CN: 'alice', O: ['dev', 'ops'] });
  });

  t.test('a certificate from another CA is not authorized', async (t) => {
    // Same CA name, different key: trust must come from the signature, not the subject.
    const other = generateCa('kmm-preflight-dev-ca');
    const intruder = issueClientCertificate({
      caCertPem: other.certPem,
      caKeyPem: other.keyPem,
      commonName: 'kmm-preflight-admin',
      organizations: ['system:masters'],
    });
    const observed = await call(intruder);
    t.equal(observed.authorized, false);
    t.not(observed.authorizationError, null);
    t.match(observed.subject, { CN: 'kmm-preflight-admin' }, 'presented, but not trusted');
  });

  t.test('a client without a certificate is not authorized', async (t) => {
    const observed = await call({});
    t.equal(observed.authorized, false);
    t.equal(observed.subject, null);
  });

  t.test('a client that does not trust the dev CA rejects the server', async (t) => {
    const other = generateCa('someone-else');
    await t.rejects(
      new Promise((resolve, reject) => {
        const req = request({ host: '127.0.0.1', port, ca: other.certPem, agent: false }, resolve);
        req.on('error', reject);
        req.end();
      }),
      { code: /UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED|UNABLE_TO_GET_ISSUER_CERT/ },
    );
  });

  t.test('a client connecting by a name outside the SANs rejects the server', async (t) => {
    await t.rejects(call(admin, 'example.org'), { code: 'ERR_TLS_CERT_ALTNAME_INVALID' });
  });
});

t.test('certs/generate.ts', async (t) => {
  const run = promisify(execFile);
  const cwd = t.testdir();
  const node = process.execPath;

  const help = await run(node, [GENERATE_CLI, '--help'], { cwd });
  t.match(help.stdout, /Usage: node certs\/generate\.ts/);

  const first = await run(node, [GENERATE_CLI, '--san', 'dev.local'], { cwd });
  t.match(first.stdout, /generated a new development PKI/);
  t.match(first.stdout, /certs\/kubeconfig/);
  t.same((await readdir(`${cwd}/certs`)).sort(), [...ALL_FILES].sort());
  t.equal((await cert(`${cwd}/certs/server.crt`)).checkHost('dev.local'), 'dev.local');

  const second = await run(node, [GENERATE_CLI, '--server', 'https://127.0.0.1:7443'], { cwd });
  t.match(second.stdout, /rewrote the kubeconfig/);

  const third = await run(node, [GENERATE_CLI, '--server', 'https://127.0.0.1:7443', '--san', '10.9.9.9'], { cwd });
  t.match(third.stdout, /nothing to do/);
  t.match(third.stderr, /lacks 10\.9\.9\.9; rerun with --force/);

  const caBefore = await pem(`${cwd}/certs/ca.crt`);
  const forced = await run(node, [GENERATE_CLI, '--force', '--dir', 'other'], { cwd });
  t.match(forced.stdout, /other\/ca\.crt/);
  t.equal(await pem(`${cwd}/certs/ca.crt`), caBefore, '--dir honoured');

  for (const args of [['--bogus'], ['positional'], ['--dir'], ['--san', 'bad name'], ['--server', 'http://x'], ['--days', 'x']]) {
    const failure = await run(node, [GENERATE_CLI, ...args], { cwd }).then(
      () => undefined,
      (error: { code: number; stderr: string }) => error,
    );
    t.equal(failure?.code, 2, `exit code 2 for ${args.join(' ')}`);
    t.match(failure?.stderr, /^generate: [^\n]*; see --help\.\n$/, 'one-sentence error');
  }
});
