/**
 * The test control plane itself (test/helpers/control-plane.ts): a real kube-apiserver on
 * loopback with RBAC, TokenRequest, the front-proxy configuration the product reads, and the
 * aggregator reaching a server on 127.0.0.1 through an ExternalName Service.
 *
 * Never skipped: without the binaries (no KUBEBUILDER_ASSETS, no cached build, no way to build)
 * this fails with the reason and what to install.
 */
import { once } from 'node:events';
import { createServer, type Server } from 'node:https';
import type { TLSSocket } from 'node:tls';
import t from 'tap';
import { generateCa, issueCertificate } from '../../src/certs/dev-pki.ts';
import { startControlPlane, type ControlPlane } from '../helpers/control-plane.ts';
import { KUBE_APISERVER_VERSION, parseDeb822, parseOneLine, pickDebianArchive } from '../helpers/kube-binaries.ts';

// Starting includes building kube-apiserver when the cache is cold and no `before` script ran.
t.setTimeout(30 * 60_000);

const NS = 'cp-test';
const pem = (s: string) => s.replace(/\r/g, '').trim();

async function eventually<T>(what: string, timeoutMs: number, attempt: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const r = await attempt();
      if (r !== undefined) return r;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

t.test('the deb-src entry for the build uses the archive of the machine\'s Debian entry', async (t) => {
  const deb822 = parseDeb822(
    [
      'Types: deb',
      '# http://snapshot.debian.org/archive/debian-security/20250520T000000Z',
      'URIs: http://deb.debian.org/debian-security',
      'Suites: bookworm-security',
      'Components: main',
      '',
      'Types: deb',
      'URIs: http://mirror.example/debian',
      'Suites: bookworm bookworm-updates',
      'Components: main contrib',
      'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg',
    ].join('\n'),
    'debian.sources',
  );
  t.same(pickDebianArchive(deb822), { uri: 'http://mirror.example/debian', signedBy: '/usr/share/keyrings/debian-archive-keyring.gpg' });
  const oneLine = parseOneLine(
    'deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n# deb http://old/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://ftp.example/debian/ bookworm main\n',
    'sources.list',
  );
  t.same(pickDebianArchive(oneLine), { uri: 'http://ftp.example/debian/', signedBy: '/k.gpg' });
  t.same(pickDebianArchive(parseDeb822('Types: deb\nURIs: http://x/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n', 'x.sources')), undefined);
});

let cp: ControlPlane | undefined;
try {
  cp = await startControlPlane();
} catch (err) {
  t.fail(`the test control plane is unavailable: ${(err as Error).message}`);
}

if (cp) {
  const plane = cp;
  t.teardown(() => plane.stop());

  const ok = async (args: readonly string[], input?: string) => {
    const r = await plane.kubectl(args, input === undefined ? {} : { input });
    if (r.code !== 0) throw new Error(`kubectl ${args.join(' ')} failed (${r.code}): ${r.stderr}`);
    return r.stdout;
  };

  t.test('kube-apiserver is ready and reports its version', async (t) => {
    t.equal((await ok(['get', '--raw', '/readyz'])).trim(), 'ok');
    const version = JSON.parse(await ok(['get', '--raw', '/version'])) as { gitVersion?: string; major?: string; minor?: string };
    t.match(version.gitVersion, /^v\d+\.\d+\.\d+/, `gitVersion ${version.gitVersion} parses`);
    if (!process.env['KUBEBUILDER_ASSETS']) t.equal(version.gitVersion, KUBE_APISERVER_VERSION, 'the cached Debian build');
    t.ok(plane.url.startsWith('https://127.0.0.1:'));
  });

  t.test('creates a namespace and a ConfigMap', async (t) => {
    await ok(['create', 'namespace', NS]);
    await ok(['create', 'configmap', 'demo', '-n', NS, '--from-literal=greeting=hello']);
    const cm = JSON.parse(await ok(['get', 'configmap', 'demo', '-n', NS, '-o', 'json'])) as { data?: Record<string, string> };
    t.same(cm.data, { greeting: 'hello' });
  });

  t.test('RBAC: a user without bindings is forbidden (403), and allowed once bound', async (t) => {
    const kubeconfig = await plane.userKubeconfig('alice', ['developers']);
    const denied = await plane.kubectl(['get', 'configmaps', '-n', NS, '-v=6'], { kubeconfig });
    t.not(denied.code, 0);
    t.match(denied.stderr, /403 Forbidden/, 'HTTP 403');
    t.match(denied.stderr, /User "alice" cannot list resource "configmaps" in API group "" in the namespace "cp-test"/);

    // A Role of its own: the aggregated ClusterRoles (view, edit, admin) stay empty without
    // kube-controller-manager's clusterrole-aggregation controller.
    await ok(['create', 'role', 'configmap-reader', '-n', NS, '--verb=get,list', '--resource=configmaps']);
    await ok(['create', 'rolebinding', 'alice-reads', '-n', NS, '--role=configmap-reader', '--user=alice']);
    const allowed = await eventually('alice to be allowed', 20_000, async () => {
      const r = await plane.kubectl(['get', 'configmaps', '-n', NS, '-o', 'name'], { kubeconfig });
      if (r.code !== 0) throw new Error(r.stderr.trim());
      return r.stdout;
    });
    t.match(allowed, /configmap\/demo/);
  });

  t.test('serviceAccountToken: a real TokenRequest token authenticates as the ServiceAccount', async (t) => {
    await ok(['create', 'serviceaccount', 'robot', '-n', NS]);
    const token = await plane.serviceAccountToken(NS, 'robot');
    t.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/, 'a JWT');
    const claims = JSON.parse(Buffer.from(token.split('.')[1]!, 'base64url').toString()) as { sub?: string };
    t.equal(claims.sub, `system:serviceaccount:${NS}:robot`);
    const r = await plane.kubectl(['--token', token, 'get', 'secrets', '-n', NS], { kubeconfig: await plane.tokenKubeconfig() });
    t.not(r.code, 0);
    t.match(r.stderr, /Forbidden/);
    t.match(r.stderr, /User "system:serviceaccount:cp-test:robot" cannot list resource "secrets"/, 'authenticated as the ServiceAccount');

    const bogus = await plane.kubectl(['--token', `${token}x`, 'get', 'secrets', '-n', NS], { kubeconfig: await plane.tokenKubeconfig() });
    t.match(bogus.stderr, /Unauthorized|must be logged in/, 'a tampered token is not accepted');
  });

  t.test('kube-system/extension-apiserver-authentication carries the client and front-proxy configuration', async (t) => {
    const cm = JSON.parse(await ok(['get', 'configmap', 'extension-apiserver-authentication', '-n', 'kube-system', '-o', 'json'])) as {
      data: Record<string, string>;
    };
    const d = cm.data;
    t.equal(pem(d['client-ca-file'] ?? ''), pem(plane.caCertPem), 'client-ca-file is the cluster CA');
    t.equal(pem(d['requestheader-client-ca-file'] ?? ''), pem(plane.frontProxyCaCertPem), 'requestheader-client-ca-file is the front-proxy CA');
    t.same(JSON.parse(d['requestheader-allowed-names'] ?? 'null'), ['front-proxy-client']);
    t.same(JSON.parse(d['requestheader-username-headers'] ?? 'null'), ['X-Remote-User']);
    t.same(JSON.parse(d['requestheader-group-headers'] ?? 'null'), ['X-Remote-Group']);
    t.same(JSON.parse(d['requestheader-extra-headers-prefix'] ?? 'null'), ['X-Remote-Extra-']);
  });

  t.test('the aggregator reaches a server on 127.0.0.1 through an ExternalName Service', async (t) => {
    const ns = 'cp-aggregated';
    const svc = 'testbed';
    const ca = generateCa('testbed-serving-ca');
    // Only the Service's name: the aggregator verifies the certificate against `<service>.<namespace>.svc`
    // even though it dials localhost.
    const serving = issueCertificate({ issuer: ca, commonName: svc, sans: [`${svc}.${ns}.svc`], extKeyUsage: ['serverAuth'] });
    interface Seen {
      path: string;
      cn: string | undefined;
      authorized: boolean;
      user: string | undefined;
      groups: string | undefined;
      servername: string | undefined;
    }
    const seen: Seen[] = [];
    const server: Server = createServer(
      { key: serving.keyPem, cert: serving.certPem, ca: plane.frontProxyCaCertPem, requestCert: true, rejectUnauthorized: false },
      (req, res) => {
        const socket = req.socket as TLSSocket;
        const peer = socket.getPeerCertificate();
        const cn = peer && 'subject' in peer && peer.subject ? peer.subject.CN : undefined;
        const header = (name: string) => {
          const v = req.headers[name];
          return Array.isArray(v) ? v.join(',') : v;
        };
        const path = (req.url ?? '').split('?')[0] ?? '';
        seen.push({
          path,
          cn: Array.isArray(cn) ? cn.join(',') : cn,
          authorized: socket.authorized,
          user: header('x-remote-user'),
          groups: header('x-remote-group'),
          servername: (socket as TLSSocket & { servername?: string | false }).servername || undefined,
        });
        res.setHeader('content-type', 'application/json');
        if (path === '/apis/testbed.example.com/v1') {
          res.end(JSON.stringify({ kind: 'APIResourceList', apiVersion: 'v1', groupVersion: 'testbed.example.com/v1', resources: [] }));
        } else {
          res.statusCode = 404;
          res.end(JSON.stringify({ kind: 'Status', apiVersion: 'v1', status: 'Failure', reason: 'NotFound', code: 404 }));
        }
      },
    );
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const address = server.address();
    const port = typeof address === 'object' && address ? address.port : 0;
    t.teardown(async () => {
      await plane.kubectl(['delete', 'apiservice', 'v1.testbed.example.com', '--ignore-not-found', '--wait=false']);
      server.closeAllConnections();
      await new Promise((r) => server.close(() => r(undefined)));
    });

    await ok(['create', 'namespace', ns]);
    const manifests = [
      { apiVersion: 'v1', kind: 'Service', metadata: { name: svc, namespace: ns }, spec: { type: 'ExternalName', externalName: 'localhost', ports: [{ name: 'https', port, protocol: 'TCP' }] } },
      {
        apiVersion: 'apiregistration.k8s.io/v1',
        kind: 'APIService',
        metadata: { name: 'v1.testbed.example.com' },
        spec: {
          group: 'testbed.example.com',
          version: 'v1',
          service: { namespace: ns, name: svc, port },
          caBundle: Buffer.from(ca.certPem).toString('base64'),
          groupPriorityMinimum: 1000,
          versionPriority: 15,
        },
      },
    ];
    await ok(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'List', items: manifests }));

    await eventually('the APIService to become Available', 90_000, async () => {
      const s = JSON.parse(await ok(['get', 'apiservice', 'v1.testbed.example.com', '-o', 'json'])) as {
        status?: { conditions?: { type: string; status: string; message?: string }[] };
      };
      const available = s.status?.conditions?.find((c) => c.type === 'Available');
      if (available?.status === 'True') return true;
      throw new Error(`Available=${available?.status}: ${available?.message ?? 'no condition yet'}`);
    });
    t.pass('APIService v1.testbed.example.com is Available');

    // The aggregator may answer 404 for a few seconds after Available (1.20).
    const body = await eventually('GET /apis/testbed.example.com/v1 through the aggregator', 60_000, async () => {
      const r = await plane.kubectl(['get', '--raw', '/apis/testbed.example.com/v1']);
      if (r.code !== 0) throw new Error(r.stderr.trim());
      return r.stdout;
    });
    t.same(JSON.parse(body), { kind: 'APIResourceList', apiVersion: 'v1', groupVersion: 'testbed.example.com/v1', resources: [] });

    // The availability checks come as X-Remote-User system:kube-aggregator (with SNI localhost on
    // 1.20); kubectl's request is proxied as the admin.
    const proxied = seen.find((s) => s.path === '/apis/testbed.example.com/v1' && s.user === 'admin');
    t.ok(proxied, `the throwaway server saw kubectl's request with X-Remote-User admin (saw: ${JSON.stringify(seen.slice(-5))})`);
    t.equal(proxied?.cn, 'front-proxy-client', 'front-proxy client certificate');
    t.equal(proxied?.authorized, true, 'signed by the front-proxy CA');
    t.match(proxied?.groups ?? '', /system:masters/, 'X-Remote-Group');
    t.equal(proxied?.servername, `${svc}.${ns}.svc`, 'SNI is <service>.<namespace>.svc');
  });
}
