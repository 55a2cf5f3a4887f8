/**
 * Runs the real server as a child process on a loopback port (the same `src/main.ts` that
 * `npm start` runs), with its own data and certificate directories, and drives kubectl at it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { request } from 'node:https';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const MAIN = join(ROOT, 'src', 'main.ts');

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolvePort(port));
    });
  });
}

export interface TestServer {
  readonly url: string;
  readonly port: number;
  readonly dir: string;
  readonly certDir: string;
  readonly kubeconfig: string;
  /** Server output so far (stdout and stderr), for failure messages. */
  output(): string;
  /** Sends a signal and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts the server again on the same port, data and certificates. */
  restart(): Promise<void>;
  /** Stops the server and removes its directories. */
  stop(): Promise<void>;
  /** An HTTPS request with the admin client certificate (or none). */
  request(method: string, path: string, options?: RequestOptions): Promise<HttpResult>;
}

export interface RequestOptions {
  readonly body?: string | Buffer;
  readonly headers?: Record<string, string>;
  readonly anonymous?: boolean;
  /** Another client certificate than the development admin's (e.g. from a cluster CA). */
  readonly clientCert?: { readonly certPem: string; readonly keyPem: string };
}

export interface HttpResult {
  readonly status: number;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly body: string;
  json<T = Record<string, unknown>>(): T;
}

export async function startTestServer(extraArgs: readonly string[] = []): Promise<TestServer> {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-test-'));
  const certDir = join(dir, 'certs');
  const port = await freePort();
  let child: ChildProcess | undefined;
  let out = '';
  let exited: Promise<void> = Promise.resolve();

  const launch = async () => {
    child = spawn(
      process.execPath,
      [MAIN, '--port', String(port), '--data-dir', join(dir, 'data'), '--cert-dir', certDir, '--log-level', 'warn', ...extraArgs],
      { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const c = child;
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    exited = new Promise((r) => c.once('exit', () => r()));
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (c.exitCode !== null) throw new Error(`the server exited with ${c.exitCode}:\n${out}`);
      try {
        const r = await doRequest('GET', '/readyz', { anonymous: true });
        if (r.status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`the server did not become ready in 30 s:\n${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  let tls: { ca: Buffer; cert: Buffer; key: Buffer } | undefined;
  const doRequest = async (method: string, path: string, o: RequestOptions = {}): Promise<HttpResult> => {
    tls ??= {
      ca: await readFile(join(certDir, 'ca.crt')),
      cert: await readFile(join(certDir, 'admin.crt')),
      key: await readFile(join(certDir, 'admin.key')),
    };
    return new Promise((resolveReq, reject) => {
      const req = request(
        {
          host: '127.0.0.1',
          port,
          method,
          path,
          ca: tls!.ca,
          ...(o.anonymous ? {} : o.clientCert ? { cert: o.clientCert.certPem, key: o.clientCert.keyPem } : { cert: tls!.cert, key: tls!.key }),
          headers: { ...(o.headers ?? {}) },
          agent: false,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            const body = Buffer.concat(chunks).toString('utf8');
            resolveReq({
              status: res.statusCode ?? 0,
              headers: res.headers,
              body,
              json: <T>() => JSON.parse(body) as T,
            });
          });
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      if (o.body !== undefined) req.write(o.body);
      req.end();
    });
  };

  await launch().catch(async (err) => {
    child?.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
    throw err;
  });

  const kill = async (signal: NodeJS.Signals = 'SIGTERM') => {
    if (child && child.exitCode === null && child.signalCode === null) {
      child.kill(signal);
      await exited;
    }
  };

  return {
    url: `https://127.0.0.1:${port}`,
    port,
    dir,
    certDir,
    kubeconfig: join(certDir, 'kubeconfig'),
    output: () => out,
    kill,
    restart: launch,
    stop: async () => {
      await kill('SIGTERM');
      await rm(dir, { recursive: true, force: true });
    },
    request: doRequest,
  };
}

export interface KubectlResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface KubectlOptions {
  readonly input?: string;
  readonly env?: Record<string, string>;
  readonly timeoutMs?: number;
}

/** Runs the machine's kubectl with a kubeconfig and a private discovery cache. */
export function runKubectl(kubeconfig: string, cacheDir: string, args: readonly string[], options: KubectlOptions = {}): Promise<KubectlResult> {
  return new Promise((resolveRun, reject) => {
    const child = spawn('kubectl', ['--kubeconfig', kubeconfig, '--cache-dir', cacheDir, ...args], {
      env: { ...process.env, ...options.env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(new Error(`kubectl could not run (is it installed and on PATH?): ${err.message}`));
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code: code ?? -1, stdout, stderr });
    });
    child.stdin.end(options.input ?? '');
  });
}

/** Runs the machine's kubectl against the server, with a private discovery cache. */
export function kubectl(server: TestServer, args: readonly string[], options: KubectlOptions = {}): Promise<KubectlResult> {
  return runKubectl(server.kubeconfig, join(server.dir, 'kube-cache'), args, options);
}

/** Starts `kubectl` in the background (for -w and wait), returning the live process and output. */
export function kubectlBackground(server: TestServer, args: readonly string[]) {
  const child = spawn('kubectl', ['--kubeconfig', server.kubeconfig, '--cache-dir', join(server.dir, 'kube-cache'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<KubectlResult>((r) => child.on('close', (code) => r({ code: code ?? -1, stdout, stderr })));
  return {
    child,
    stdout: () => stdout,
    stderr: () => stderr,
    done,
    /** Resolves when stdout satisfies `predicate`, or rejects after `timeoutMs`. */
    async waitFor(predicate: (out: string) => boolean, timeoutMs = 20_000): Promise<string> {
      const deadline = Date.now() + timeoutMs;
      while (!predicate(stdout)) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for kubectl output; stdout:\n${stdout}\nstderr:\n${stderr}`);
        if (child.exitCode !== null) throw new Error(`kubectl exited ${child.exitCode}; stdout:\n${stdout}\nstderr:\n${stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      return stdout;
    },
  };
}
