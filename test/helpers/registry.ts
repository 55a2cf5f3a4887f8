/**
 * A real OCI registry for tests: Debian's `docker-registry` (docker/distribution 2.8) on a
 * loopback port with a temporary storage directory, optionally behind TLS, Basic auth
 * (htpasswd, bcrypt via apache2-utils) or token auth (an in-process token server that signs
 * RS256 JWTs with a certificate in the registry's `rootcertbundle`, as
 * distribution's `registry/auth/token` verifies them: `x5c` chain to a trusted root, `iss`,
 * `aud` = service, `exp`/`nbf`, `access` claims for the granted scope).
 *
 * Also a fault-injecting HTTP(S) proxy in front of a registry, for retry and integrity tests.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createSign, randomBytes, randomUUID, X509Certificate } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { stringify as stringifyYaml } from 'yaml';
import { generateCa, issueCertificate, type CertificateAndKey } from '../../src/certs/dev-pki.ts';
import { parseDockerConfigJson } from '../../src/registry/docker-config.ts';
import type { RegistryAccess } from '../../src/registry/types.ts';
import { ensureDebianBinary } from './debian.ts';
import { freePort } from './server.ts';

const run = promisify(execFile);

export const TOKEN_SERVICE = 'kmm-preflight-test-registry';
export const TOKEN_ISSUER = 'kmm-preflight-test-token-issuer';

export interface TestRegistry {
  /** `127.0.0.1:PORT`: the registry part of image references. */
  readonly host: string;
  /** `http://127.0.0.1:PORT` or `https://…`. */
  readonly url: string;
  /** The CA that signed the serving certificate, when TLS is on. */
  readonly caCertPem?: string;
  /** The one account, when auth is on. */
  readonly credentials?: { readonly username: string; readonly password: string };
  /** A refresh token the token server accepts for `credentials.username` (token auth only). */
  readonly refreshToken?: string;
  /** A `.dockerconfigjson` with `credentials` for `host` (empty `auths` without auth). */
  dockerConfigJson(): string;
  /** Token requests the token server has answered (token auth only). */
  tokenRequests(): number;
  /** Registry output so far, for failure messages. */
  output(): string;
  stop(): Promise<void>;
}

export interface StartRegistryOptions {
  readonly auth?: 'none' | 'token' | 'htpasswd';
  readonly tls?: boolean;
}

/** How the client reaches `registry`: its CA, plain HTTP when it has no TLS, its pull secret. */
export function accessFor(registry: Pick<TestRegistry, 'url' | 'caCertPem' | 'dockerConfigJson'>): RegistryAccess {
  return {
    credentials: parseDockerConfigJson(registry.dockerConfigJson()),
    ...(registry.url.startsWith('http:') ? { insecure: true } : {}),
    ...(registry.caCertPem !== undefined ? { caCertificates: [registry.caCertPem] } : {}),
  };
}

/** A `.dockerconfigjson` for one host. */
export function dockerConfigFor(host: string, credentials?: { username: string; password: string }): string {
  const auths: Record<string, { auth: string }> = {};
  if (credentials) auths[host] = { auth: Buffer.from(`${credentials.username}:${credentials.password}`).toString('base64') };
  return JSON.stringify({ auths });
}

// Children are killed when the test process exits, even on a crash.
const children = new Set<ChildProcess>();
let exitHookInstalled = false;
function track(child: ChildProcess): void {
  children.add(child);
  child.once('exit', () => children.delete(child));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of children) c.kill('SIGKILL');
    });
  }
}

let tlsMaterial: { ca: CertificateAndKey; server: CertificateAndKey } | undefined;
/** One CA and serving certificate for all TLS registries and proxies of a test process. */
export function testTls(): { ca: CertificateAndKey; server: CertificateAndKey } {
  if (tlsMaterial === undefined) {
    const ca = generateCa('kmm-preflight-test-registry-ca');
    const server = issueCertificate({ issuer: ca, commonName: '127.0.0.1', sans: ['127.0.0.1', 'localhost', '::1'], extKeyUsage: ['serverAuth'] });
    tlsMaterial = { ca, server };
  }
  return tlsMaterial;
}

async function listen(server: http.Server | https.Server): Promise<number> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return (server.address() as AddressInfo).port;
}

/** Closes a server and the connections it still holds. */
async function closeServer(server: http.Server | https.Server): Promise<void> {
  await new Promise<void>((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/** Makes the server destroy sockets on stop: closeAllConnections misses upgraded/raw ones. */
function trackSockets(server: http.Server | https.Server): Set<Socket> {
  const sockets = new Set<Socket>();
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  return sockets;
}

// -------------------------------------------------------------------------------------------
// Token server

interface TokenServer {
  readonly realm: string;
  readonly rootCertPem: string;
  readonly requests: () => number;
  close(): Promise<void>;
}

function b64url(data: Buffer | string): string {
  return Buffer.from(data).toString('base64url');
}

/** The access a scope asks for, granted in full: `repository:name:pull,push` → claim. */
function parseScope(scope: string): { type: string; name: string; actions: string[] } | undefined {
  const first = scope.indexOf(':');
  const last = scope.lastIndexOf(':');
  if (first === -1 || last === first) return undefined;
  return { type: scope.slice(0, first), name: scope.slice(first + 1, last), actions: scope.slice(last + 1).split(',').filter(Boolean) };
}

async function startTokenServer(credentials: { username: string; password: string }, refreshToken: string, tls: boolean): Promise<TokenServer> {
  const signingCa = generateCa('kmm-preflight-test-token-ca');
  const signer = issueCertificate({ issuer: signingCa, commonName: 'kmm-preflight-test-token-signer' });
  const x5c = [new X509Certificate(signer.certPem).raw.toString('base64')];
  let count = 0;

  const issue = (account: string | undefined, scopes: string[], service: string | null) => {
    const nowS = Math.floor(Date.now() / 1000);
    const header = { typ: 'JWT', alg: 'RS256', x5c };
    const claims = {
      iss: TOKEN_ISSUER,
      sub: account ?? '',
      aud: service ?? TOKEN_SERVICE,
      exp: nowS + 300,
      nbf: nowS - 10,
      iat: nowS,
      jti: randomUUID(),
      // Anonymous callers get a token without access: the registry then refuses them, as
      // Docker Hub does for private repositories.
      access: account === undefined ? [] : scopes.map(parseScope).filter((s) => s !== undefined),
    };
    const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    const signature = createSign('RSA-SHA256').update(signingInput).sign(signer.keyPem);
    return `${signingInput}.${b64url(signature)}`;
  };

  const handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      count++;
      const url = new URL(req.url ?? '/', 'http://token');
      const deny = () => {
        res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Basic realm="token"' });
        res.end(JSON.stringify({ details: 'incorrect username or password' }));
      };
      if (url.pathname !== '/token') {
        res.writeHead(404).end();
        return;
      }
      let account: string | undefined;
      let scopes: string[];
      let service: string | null;
      if (req.method === 'POST') {
        const form = new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
        if (form.get('grant_type') !== 'refresh_token' || form.get('refresh_token') !== refreshToken) return deny();
        account = credentials.username;
        scopes = form.getAll('scope');
        service = form.get('service');
        const token = issue(account, scopes, service);
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ access_token: token, expires_in: 300, scope: scopes.join(' ') }));
        return;
      }
      const authorization = req.headers.authorization;
      if (authorization !== undefined) {
        const m = /^Basic (.+)$/i.exec(authorization);
        const decoded = m ? Buffer.from(m[1]!, 'base64').toString('utf8') : '';
        if (decoded !== `${credentials.username}:${credentials.password}`) return deny();
        account = credentials.username;
      }
      scopes = url.searchParams.getAll('scope');
      service = url.searchParams.get('service');
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ token: issue(account, scopes, service), expires_in: 300, issued_at: new Date().toISOString() }));
    });
  };
  const { server: serving } = testTls();
  const server = tls ? https.createServer({ cert: serving.certPem, key: serving.keyPem }, handler) : http.createServer(handler);
  const port = await listen(server);
  return {
    realm: `${tls ? 'https' : 'http'}://127.0.0.1:${port}/token`,
    rootCertPem: signingCa.certPem,
    requests: () => count,
    close: () => closeServer(server),
  };
}

// -------------------------------------------------------------------------------------------
// The registry

/** Starts Debian's docker-registry on a loopback port; stop it in teardown. */
export async function startRegistry(options: StartRegistryOptions = {}): Promise<TestRegistry> {
  const binary = await ensureDebianBinary('docker-registry', 'docker-registry');
  const authMode = options.auth ?? 'none';
  const tls = options.tls === true;
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-registry-'));
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  const url = `${tls ? 'https' : 'http'}://${host}`;
  const credentials = authMode === 'none' ? undefined : { username: 'kmm-tester', password: `pw-${randomBytes(12).toString('hex')}` };
  const refreshToken = authMode === 'token' ? `rt-${randomBytes(16).toString('hex')}` : undefined;

  let tokenServer: TokenServer | undefined;
  let child: ChildProcess | undefined;
  let out = '';
  try {
    const config: Record<string, unknown> = {
      version: 0.1,
      log: { level: 'warn', accesslog: { disabled: true }, formatter: 'text' },
      storage: { filesystem: { rootdirectory: join(dir, 'storage') }, delete: { enabled: true }, maintenance: { uploadpurging: { enabled: false } } },
      http: { addr: host, secret: randomBytes(16).toString('hex') },
    };
    const httpConfig = config['http'] as Record<string, unknown>;
    if (tls) {
      const { server } = testTls();
      await writeFile(join(dir, 'server.crt'), server.certPem);
      await writeFile(join(dir, 'server.key'), server.keyPem, { mode: 0o600 });
      httpConfig['tls'] = { certificate: join(dir, 'server.crt'), key: join(dir, 'server.key') };
    }
    if (authMode === 'htpasswd') {
      const htpasswd = await ensureDebianBinary('htpasswd', 'apache2-utils');
      const { stdout } = await run(htpasswd, ['-Bbn', credentials!.username, credentials!.password], { timeout: 30_000 });
      await writeFile(join(dir, 'htpasswd'), stdout.trim() + '\n', { mode: 0o600 });
      config['auth'] = { htpasswd: { realm: 'kmm-preflight-test', path: join(dir, 'htpasswd') } };
    } else if (authMode === 'token') {
      tokenServer = await startTokenServer(credentials!, refreshToken!, tls);
      await writeFile(join(dir, 'token-root.crt'), tokenServer.rootCertPem);
      config['auth'] = {
        token: { realm: tokenServer.realm, service: TOKEN_SERVICE, issuer: TOKEN_ISSUER, rootcertbundle: join(dir, 'token-root.crt') },
      };
    }
    const configPath = join(dir, 'config.yml');
    await writeFile(configPath, stringifyYaml(config));

    child = spawn(binary, ['serve', configPath], { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin' } });
    track(child);
    const c = child;
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    await waitReady(c, url, () => out);
  } catch (err) {
    child?.kill('SIGKILL');
    await tokenServer?.close();
    await rm(dir, { recursive: true, force: true });
    throw err;
  }

  const proc = child;
  return {
    host,
    url,
    ...(tls ? { caCertPem: testTls().ca.certPem } : {}),
    ...(credentials ? { credentials } : {}),
    ...(refreshToken ? { refreshToken } : {}),
    dockerConfigJson: () => dockerConfigFor(host, credentials),
    tokenRequests: () => tokenServer?.requests() ?? 0,
    output: () => out,
    stop: async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise<void>((r) => proc.once('exit', () => r()));
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(timer);
      }
      await tokenServer?.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

async function waitReady(child: ChildProcess, url: string, output: () => string): Promise<void> {
  const deadline = Date.now() + 30_000;
  const { ca } = testTls();
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`docker-registry exited (${child.exitCode ?? child.signalCode}) before it was ready:\n${output()}`);
    }
    const status = await new Promise<number>((resolve) => {
      const mod = url.startsWith('https:') ? https : http;
      const req = mod.request(`${url}/v2/`, { method: 'GET', timeout: 1000, ...(url.startsWith('https:') ? { ca: ca.certPem } : {}) }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', () => resolve(0));
      req.on('timeout', () => req.destroy());
      req.end();
    });
    if (status === 200 || status === 401) return;
    if (Date.now() > deadline) throw new Error(`docker-registry did not answer on ${url} within 30 s:\n${output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// -------------------------------------------------------------------------------------------
// Fault proxy

export type Fault =
  /** Answer with this status (e.g. 429 with `retry-after`, 500) instead of forwarding. */
  | { readonly kind: 'status'; readonly status: number; readonly headers?: Readonly<Record<string, string>>; readonly body?: string | Buffer }
  /** Reset the connection (TCP RST) before answering. */
  | { readonly kind: 'reset' }
  /** Forward, flipping the bits of one byte of the body (default: the middle one). */
  | { readonly kind: 'corrupt'; readonly offset?: number }
  /** Forward, sending the body `chunkBytes` at a time with `delayMs` between chunks. */
  | { readonly kind: 'slow'; readonly chunkBytes?: number; readonly delayMs: number }
  /** Forward, dropping `content-length` so the body arrives chunked, of unannounced length. */
  | { readonly kind: 'chunked' }
  /** Redirect (307) to the same path on the registry itself: another origin, as blob storage is. */
  | { readonly kind: 'redirect'; readonly status?: 301 | 302 | 303 | 307 | 308 };

export interface FaultRule {
  readonly method?: string;
  /** A substring or a pattern of the request path (with query). */
  readonly path?: string | RegExp;
  /** Let this many matching requests through before the fault applies. Default 0. */
  readonly skip?: number;
  /** Apply the fault to this many matching requests (Infinity: all). Default 1. */
  readonly times?: number;
  readonly fault: Fault;
}

export interface ProxiedRequest {
  readonly method: string;
  readonly path: string;
  /** The fault applied, if any. */
  readonly fault?: Fault['kind'];
}

export interface FaultProxy extends TestRegistry {
  /** Every request the proxy saw, in order. */
  readonly requests: readonly ProxiedRequest[];
}

/**
 * Starts a proxy in front of `target` that forwards everything but what `script` matches (each
 * request takes the first rule that still applies). It serves TLS when `target` does, with the
 * same test CA, and accepts the same credentials.
 */
export async function startFaultProxy(target: TestRegistry, script: readonly FaultRule[]): Promise<FaultProxy> {
  const tls = target.url.startsWith('https:');
  const state = script.map((rule) => ({ rule, seen: 0, applied: 0 }));
  const requests: ProxiedRequest[] = [];
  const targetUrl = new URL(target.url);

  const pick = (req: http.IncomingMessage): Fault | undefined => {
    for (const s of state) {
      const { rule } = s;
      if (rule.method !== undefined && rule.method.toUpperCase() !== req.method) continue;
      const path = req.url ?? '/';
      if (rule.path !== undefined && !(typeof rule.path === 'string' ? path.includes(rule.path) : rule.path.test(path))) continue;
      s.seen++;
      if (s.seen <= (rule.skip ?? 0)) continue;
      if (s.applied >= (rule.times ?? 1)) continue;
      s.applied++;
      return rule.fault;
    }
    return undefined;
  };

  const handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
    const fault = pick(req);
    requests.push({ method: req.method ?? 'GET', path: req.url ?? '/', ...(fault ? { fault: fault.kind } : {}) });
    if (fault?.kind === 'reset') {
      req.socket.resetAndDestroy();
      return;
    }
    if (fault?.kind === 'status') {
      req.resume();
      const body = fault.body ?? JSON.stringify({ errors: [{ code: fault.status === 429 ? 'TOOMANYREQUESTS' : 'UNKNOWN', message: 'injected fault' }] });
      res.writeHead(fault.status, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), ...(fault.headers ?? {}) });
      res.end(body);
      return;
    }
    if (fault?.kind === 'redirect') {
      req.resume();
      res.writeHead(fault.status ?? 307, { location: `${target.url}${req.url ?? '/'}`, 'content-length': '0' });
      res.end();
      return;
    }
    const mod = tls ? https : http;
    const upstream = mod.request(
      {
        host: targetUrl.hostname,
        port: targetUrl.port,
        method: req.method,
        path: req.url,
        // The incoming Host is kept: the registry builds upload Locations from it.
        headers: req.headers,
        ...(tls ? { ca: target.caCertPem } : {}),
        agent: false,
      },
      (up) => {
        const headers = { ...up.headers };
        if (fault?.kind === 'chunked') delete headers['content-length'];
        if (fault?.kind === 'slow') {
          res.writeHead(up.statusCode ?? 502, headers);
          const chunkBytes = fault.chunkBytes ?? 16;
          const queue: Buffer[] = [];
          let ended = false;
          let timer: NodeJS.Timeout | undefined;
          const pump = () => {
            timer = undefined;
            const next = queue.shift();
            if (next === undefined) {
              if (ended) res.end();
              return;
            }
            const piece = next.subarray(0, chunkBytes);
            if (next.length > chunkBytes) queue.unshift(next.subarray(chunkBytes));
            res.write(piece);
            timer = setTimeout(pump, fault.delayMs);
          };
          up.on('data', (d: Buffer) => {
            queue.push(d);
            if (timer === undefined) pump();
          });
          up.on('end', () => {
            ended = true;
            if (timer === undefined) pump();
          });
          res.on('close', () => {
            if (timer) clearTimeout(timer);
            up.destroy();
          });
          return;
        }
        if (fault?.kind === 'corrupt') {
          const length = Number(up.headers['content-length'] ?? 0);
          const at = fault.offset ?? Math.floor(length / 2);
          let pos = 0;
          res.writeHead(up.statusCode ?? 502, headers);
          up.on('data', (d: Buffer) => {
            if (at >= pos && at < pos + d.length) {
              const copy = Buffer.from(d);
              copy[at - pos] = copy[at - pos]! ^ 0xff;
              d = copy;
            }
            pos += d.length;
            res.write(d);
          });
          up.on('end', () => res.end());
          return;
        }
        res.writeHead(up.statusCode ?? 502, headers);
        up.pipe(res);
      },
    );
    upstream.on('error', (err) => {
      if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`proxy: ${err.message}`);
    });
    req.pipe(upstream);
  };

  const { server: serving } = testTls();
  const server = tls ? https.createServer({ cert: serving.certPem, key: serving.keyPem }, handler) : http.createServer(handler);
  const sockets = trackSockets(server);
  const port = await listen(server);
  const host = `127.0.0.1:${port}`;
  return {
    host,
    url: `${tls ? 'https' : 'http'}://${host}`,
    ...(target.caCertPem !== undefined ? { caCertPem: target.caCertPem } : {}),
    ...(target.credentials ? { credentials: target.credentials } : {}),
    ...(target.refreshToken ? { refreshToken: target.refreshToken } : {}),
    requests,
    dockerConfigJson: () => dockerConfigFor(host, target.credentials),
    tokenRequests: () => target.tokenRequests(),
    output: () => target.output(),
    stop: async () => {
      for (const s of sockets) s.destroy();
      await closeServer(server);
    },
  };
}
