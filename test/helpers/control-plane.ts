/**
 * A real Kubernetes control plane for the tests, envtest-style: etcd plus kube-apiserver on
 * loopback ports, with a fresh PKI in a temporary directory and no controller-manager or
 * scheduler. Binaries come from test/helpers/kube-binaries.ts (KUBEBUILDER_ASSETS or the cached
 * Debian build of v1.20.2). See docs/adr/0005-test-control-plane.md.
 *
 * Reaching a server on 127.0.0.1 through the aggregator: kube-apiserver runs with
 * `--enable-aggregator-routing=false`, so an APIService (or webhook `service`) naming a Service
 * of type ExternalName with `externalName: localhost` and the server's port is proxied to
 * localhost; the server's certificate needs the SAN `<service>.<namespace>.svc`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { stringify as stringifyYaml } from 'yaml';
import { generateCa, issueCertificate, issueClientCertificate, renderKubeconfig } from '../../src/certs/dev-pki.ts';
import { startEtcd, type TestEtcd } from './etcd.ts';
import { ensureEtcdBinary, ensureKubeApiserver } from './kube-binaries.ts';
import { freePort, runKubectl } from './server.ts';

export interface KubectlOptions {
  readonly input?: string;
  readonly env?: Record<string, string>;
  readonly timeoutMs?: number;
  /** Another kubeconfig (e.g. from {@link ControlPlane.userKubeconfig}) instead of the admin one. */
  readonly kubeconfig?: string;
}

export interface KubectlRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface ControlPlane {
  /** https://127.0.0.1:<port> */
  readonly url: string;
  /** Admin kubeconfig file (user `admin`, group system:masters). */
  readonly kubeconfig: string;
  readonly dir: string;
  /** The cluster CA: signs the serving certificate, and is the client CA (`--client-ca-file`). */
  readonly caCertPem: string;
  readonly caKeyPem: string;
  readonly frontProxyCaCertPem: string;
  /** The aggregator's client certificate (CN front-proxy-client). */
  readonly frontProxyClientCertPem: string;
  readonly frontProxyClientKeyPem: string;
  readonly etcdUrl: string;
  /** kube-apiserver's output so far (the last 256 KiB), for failure messages. */
  output(): string;
  /** The machine's kubectl with the admin kubeconfig and a private discovery cache. */
  kubectl(args: readonly string[], opts?: KubectlOptions): Promise<KubectlRun>;
  /** A kubeconfig file for `user` in `groups`, with a client certificate signed by the cluster CA (for RBAC tests). */
  userKubeconfig(user: string, groups?: readonly string[]): Promise<string>;
  /**
   * A kubeconfig file with the cluster only and, when given, a bearer token as the user: for
   * `kubectl --token` or ServiceAccount tokens (the admin kubeconfig's client certificate would
   * authenticate first).
   */
  tokenKubeconfig(token?: string): Promise<string>;
  /** A ServiceAccount token from the real TokenRequest API (create the ServiceAccount first). */
  serviceAccountToken(namespace: string, name: string): Promise<string>;
  /** An HTTPS request to kube-apiserver with the admin client certificate. */
  request(method: string, path: string, body?: unknown): Promise<{ status: number; body: string }>;
  /** Stops kube-apiserver and etcd and removes the directory. */
  stop(): Promise<void>;
}

export interface ControlPlaneOptions {
  /** Appended to the kube-apiserver flags (a later flag wins over an earlier one). */
  readonly extraApiServerArgs?: readonly string[];
  /** How long to wait for /readyz and the authentication ConfigMap; default 90 s. */
  readonly readyTimeoutMs?: number;
}

const OUTPUT_LIMIT = 256 * 1024;
const AUTH_CONFIGMAP = '/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication';

/** etcd from KUBEBUILDER_ASSETS when set, else Debian's etcd-server. */
async function startEtcdForControlPlane(): Promise<TestEtcd> {
  return startEtcd({ binary: await ensureEtcdBinary() });
}

export async function startControlPlane(options: ControlPlaneOptions = {}): Promise<ControlPlane> {
  const apiserverBinary = await ensureKubeApiserver();
  const readyTimeoutMs = options.readyTimeoutMs ?? 90_000;
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-cp-'));
  let etcd: TestEtcd | undefined;
  let child: ChildProcess | undefined;
  let out = '';
  let exited: Promise<void> = Promise.resolve();

  const killApiserver = async (): Promise<void> => {
    const c = child;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    c.kill('SIGTERM');
    const timer = setTimeout(() => c.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  };
  // If the test process exits without stop() (an uncaught error, tap's timeout), the processes
  // must not outlive it: kill them and remove the directory synchronously on exit.
  const onExit = () => {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    if (etcd) {
      void etcd.kill(true); // sends SIGKILL synchronously
      const etcdDir = dirname(etcd.dataDir); // startEtcd's temporary directory
      if (basename(etcdDir).startsWith('kmm-preflight-etcd-')) rmSync(etcdDir, { recursive: true, force: true });
    }
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', onExit);
  const cleanup = async (): Promise<void> => {
    process.removeListener('exit', onExit);
    await killApiserver();
    await etcd?.stop();
    await rm(dir, { recursive: true, force: true });
  };

  try {
    // --- PKI -----------------------------------------------------------------------------------
    const pki = join(dir, 'pki');
    await mkdir(pki, { mode: 0o700 });
    const ca = generateCa('kmm-preflight-test-cluster-ca');
    const serving = issueCertificate({
      issuer: ca,
      commonName: 'kube-apiserver',
      sans: ['127.0.0.1', 'localhost', 'kubernetes', 'kubernetes.default', 'kubernetes.default.svc', 'kubernetes.default.svc.cluster.local', '10.0.0.1'],
      extKeyUsage: ['serverAuth'],
    });
    const admin = issueClientCertificate({ caCertPem: ca.certPem, caKeyPem: ca.keyPem, commonName: 'admin', organizations: ['system:masters'] });
    const frontProxyCa = generateCa('kmm-preflight-test-front-proxy-ca');
    const frontProxyClient = issueCertificate({ issuer: frontProxyCa, commonName: 'front-proxy-client', extKeyUsage: ['clientAuth'] });
    const sa = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const files = {
      caCert: join(pki, 'ca.crt'),
      servingCert: join(pki, 'apiserver.crt'),
      servingKey: join(pki, 'apiserver.key'),
      frontProxyCaCert: join(pki, 'front-proxy-ca.crt'),
      frontProxyClientCert: join(pki, 'front-proxy-client.crt'),
      frontProxyClientKey: join(pki, 'front-proxy-client.key'),
      saKey: join(pki, 'sa.key'),
      saPub: join(pki, 'sa.pub'),
    };
    await Promise.all([
      writeFile(files.caCert, ca.certPem),
      writeFile(files.servingCert, serving.certPem),
      writeFile(files.servingKey, serving.keyPem, { mode: 0o600 }),
      writeFile(files.frontProxyCaCert, frontProxyCa.certPem),
      writeFile(files.frontProxyClientCert, frontProxyClient.certPem),
      writeFile(files.frontProxyClientKey, frontProxyClient.keyPem, { mode: 0o600 }),
      writeFile(files.saKey, sa.privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(), { mode: 0o600 }),
      writeFile(files.saPub, sa.publicKey.export({ type: 'spki', format: 'pem' }).toString()),
    ]);

    // --- etcd and kube-apiserver ---------------------------------------------------------------
    etcd = await startEtcdForControlPlane();
    const port = await freePort();
    const url = `https://127.0.0.1:${port}`;
    const kubeconfig = join(dir, 'admin.kubeconfig');
    await writeFile(kubeconfig, renderKubeconfig({ serverUrl: url, caCertPem: ca.certPem, clientCertPem: admin.certPem, clientKeyPem: admin.keyPem }), { mode: 0o600 });

    const args = [
      `--etcd-servers=${etcd.url}`,
      '--bind-address=127.0.0.1',
      '--advertise-address=127.0.0.1',
      `--secure-port=${port}`,
      `--cert-dir=${join(dir, 'cert-dir')}`,
      `--client-ca-file=${files.caCert}`,
      `--tls-cert-file=${files.servingCert}`,
      `--tls-private-key-file=${files.servingKey}`,
      '--authorization-mode=RBAC',
      // The `kubernetes` Endpoints could not hold 127.0.0.1 anyway.
      '--endpoint-reconciler-type=none',
      '--service-cluster-ip-range=10.0.0.0/24',
      // Proxy to the Service (an ExternalName to localhost works), not to its endpoints.
      '--enable-aggregator-routing=false',
      `--requestheader-client-ca-file=${files.frontProxyCaCert}`,
      '--requestheader-allowed-names=front-proxy-client',
      '--requestheader-username-headers=X-Remote-User',
      '--requestheader-group-headers=X-Remote-Group',
      '--requestheader-extra-headers-prefix=X-Remote-Extra-',
      `--proxy-client-cert-file=${files.frontProxyClientCert}`,
      `--proxy-client-key-file=${files.frontProxyClientKey}`,
      '--service-account-issuer=https://kubernetes.default.svc.cluster.local',
      `--service-account-key-file=${files.saPub}`,
      `--service-account-signing-key-file=${files.saKey}`,
      // No controller-manager creates the `default` ServiceAccount or its token Secret.
      '--disable-admission-plugins=ServiceAccount',
      '--allow-privileged=true',
      '--profiling=false',
      ...(options.extraApiServerArgs ?? []),
    ];
    const c = spawn(apiserverBinary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    child = c;
    const append = (d: Buffer) => {
      out += d.toString();
      if (out.length > OUTPUT_LIMIT * 2) out = out.slice(-OUTPUT_LIMIT);
    };
    c.stdout!.on('data', append);
    c.stderr!.on('data', append);
    exited = new Promise((r) => c.once('exit', () => r()));
    const spawnError = new Promise<never>((_, reject) => c.once('error', (err) => reject(new Error(`kube-apiserver could not run: ${err.message}`))));
    spawnError.catch(() => undefined);

    const tls = { ca: ca.certPem, cert: admin.certPem, key: admin.keyPem };
    const doRequest = (method: string, path: string, body?: unknown) => httpsRequest(port, tls, method, path, body);

    // --- readiness ---------------------------------------------------------------------------
    const deadline = Date.now() + readyTimeoutMs;
    const waitFor = async (what: string, ok: () => Promise<boolean>) => {
      for (;;) {
        if (c.exitCode !== null || c.signalCode !== null) throw new Error(`kube-apiserver exited (${c.signalCode ?? c.exitCode}) while waiting for ${what}`);
        if (await Promise.race([ok().catch(() => false), spawnError])) return;
        if (Date.now() > deadline) throw new Error(`timed out after ${readyTimeoutMs / 1000} s waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    await waitFor('/readyz', async () => {
      const r = await doRequest('GET', '/readyz');
      return r.status === 200 && r.body.trim() === 'ok';
    });
    await waitFor(`the ConfigMap kube-system/extension-apiserver-authentication`, async () => {
      const r = await doRequest('GET', AUTH_CONFIGMAP);
      if (r.status !== 200) return false;
      const data = (JSON.parse(r.body) as { data?: Record<string, string> }).data ?? {};
      return 'client-ca-file' in data && 'requestheader-client-ca-file' in data;
    });

    const kubeCache = join(dir, 'kube-cache');
    let users = 0;
    const etcdUrl = etcd.url;
    const kubectlRun = (args2: readonly string[], o: KubectlOptions = {}) => runKubectl(o.kubeconfig ?? kubeconfig, kubeCache, args2, o);

    return {
      url,
      kubeconfig,
      dir,
      caCertPem: ca.certPem,
      caKeyPem: ca.keyPem,
      frontProxyCaCertPem: frontProxyCa.certPem,
      frontProxyClientCertPem: frontProxyClient.certPem,
      frontProxyClientKeyPem: frontProxyClient.keyPem,
      etcdUrl,
      output: () => out,
      kubectl: kubectlRun,
      request: doRequest,
      async userKubeconfig(user: string, groups: readonly string[] = []): Promise<string> {
        const cert = issueClientCertificate({ caCertPem: ca.certPem, caKeyPem: ca.keyPem, commonName: user, organizations: [...groups] });
        await mkdir(join(dir, 'users'), { recursive: true, mode: 0o700 });
        const file = join(dir, 'users', `${++users}-${user.replace(/[^A-Za-z0-9._-]+/g, '_')}.kubeconfig`);
        await writeFile(file, renderKubeconfig({ serverUrl: url, caCertPem: ca.certPem, clientCertPem: cert.certPem, clientKeyPem: cert.keyPem }), { mode: 0o600 });
        return file;
      },
      async tokenKubeconfig(token?: string): Promise<string> {
        await mkdir(join(dir, 'users'), { recursive: true, mode: 0o700 });
        const file = join(dir, 'users', `${++users}-token.kubeconfig`);
        const config = {
          apiVersion: 'v1',
          kind: 'Config',
          clusters: [{ name: 'test', cluster: { server: url, 'certificate-authority-data': Buffer.from(ca.certPem).toString('base64') } }],
          users: [{ name: 'test', user: token === undefined ? {} : { token } }],
          contexts: [{ name: 'test', context: { cluster: 'test', user: 'test' } }],
          'current-context': 'test',
        };
        await writeFile(file, stringifyYaml(config), { mode: 0o600 });
        return file;
      },
      async serviceAccountToken(namespace: string, name: string): Promise<string> {
        const path = `/api/v1/namespaces/${encodeURIComponent(namespace)}/serviceaccounts/${encodeURIComponent(name)}/token`;
        const r = await doRequest('POST', path, { apiVersion: 'authentication.k8s.io/v1', kind: 'TokenRequest', spec: { expirationSeconds: 3600 } });
        if (r.status !== 201 && r.status !== 200) throw new Error(`TokenRequest for ${namespace}/${name} failed with ${r.status}: ${r.body}`);
        const token = (JSON.parse(r.body) as { status?: { token?: string } }).status?.token;
        if (!token) throw new Error(`TokenRequest for ${namespace}/${name} returned no token: ${r.body}`);
        return token;
      },
      stop: cleanup,
    };
  } catch (err) {
    const apiserverOutput = out.slice(-16_000);
    const etcdOutput = etcd?.output().slice(-4000) ?? '';
    await cleanup().catch(() => undefined);
    throw new Error(
      `the test control plane did not start: ${(err as Error).message}\n--- kube-apiserver output (tail) ---\n${apiserverOutput}\n--- etcd output (tail) ---\n${etcdOutput}`,
      { cause: err },
    );
  }
}

function httpsRequest(
  port: number,
  tls: { ca: string; cert: string; key: string },
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; body: string }> {
  return new Promise((resolveReq, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = request(
      {
        host: '127.0.0.1',
        port,
        method,
        path,
        ca: tls.ca,
        cert: tls.cert,
        key: tls.key,
        agent: false,
        headers: { accept: 'application/json', ...(payload === undefined ? {} : { 'content-type': 'application/json' }) },
        timeout: 10_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () => resolveReq({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path} timed out`)));
    req.on('error', reject);
    req.end(payload);
  });
}

