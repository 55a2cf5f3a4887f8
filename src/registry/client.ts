/**
 * The OCI distribution client: resolves image manifests (through an index to one platform) and
 * streams blobs from real registries with undici, and pushes blobs and manifests (for test
 * fixtures and later tools).
 *
 * - Auth: anonymous first; a 401 challenge leads to the Bearer token flow (credentials, refresh
 *   token or anonymous) or to Basic auth. Tokens are cached per registry, scope and credentials,
 *   so a token obtained with one pull secret is never sent on behalf of another.
 * - Retries with exponential backoff and jitter on 429 (honouring `Retry-After`), 5xx and
 *   connection failures, for every request whose body can be sent again and, for blobs, only
 *   until the response body starts.
 * - Integrity: manifests fetched by digest are verified before use; blob streams are verified as
 *   they pass and error at their end on a mismatch. **Data read from a blob stream is provisional
 *   until the stream ends cleanly**: a consumer (the image stage) must not report a verdict from
 *   it before `end`, and must drop its findings when the stream errors.
 *
 * Errors are {@link RegistryError}s with one sentence that names the registry. Credentials and
 * tokens never appear in messages, causes or URLs that are reported; a caller's abort rejects
 * with the caller's `signal.reason` as is.
 */
import { createHash, type Hash } from 'node:crypto';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { setTimeout as sleepTimer } from 'node:timers/promises';
import { rootCertificates } from 'node:tls';
import { Agent, request as undiciRequest, type Dispatcher } from 'undici';
import { withDefaultTag, type ImageReference } from '../image/reference.ts';
import { findRegistryAuth, hasCredentials } from './docker-config.ts';
import {
  RegistryError,
  type Descriptor,
  type Platform,
  type RegistryAccess,
  type RegistryAuth,
  type RegistryClient,
  type RegistryErrorCode,
  type RequestOptions,
  type ResolvedImage,
} from './types.ts';

export const MEDIA_TYPES = {
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerSchema1: 'application/vnd.docker.distribution.manifest.v1+json',
  dockerSchema1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
} as const;

const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerManifestList, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest].join(', ');
const INDEX_TYPES: ReadonlySet<string> = new Set([MEDIA_TYPES.ociIndex, MEDIA_TYPES.dockerManifestList]);
const IMAGE_TYPES: ReadonlySet<string> = new Set([MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifest]);
const SCHEMA1_TYPES: ReadonlySet<string> = new Set([MEDIA_TYPES.dockerSchema1, MEDIA_TYPES.dockerSchema1Signed, 'application/json']);

const DIGEST_RE = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;
const ERROR_BODY_LIMIT = 64 * 1024;
const MAX_REDIRECTS = 10;
const MAX_INDEX_DEPTH = 2;
const MAX_CACHED_TOKENS = 1000;
const TOKEN_EXPIRY_MARGIN_MS = 5_000;
const DEFAULT_TOKEN_LIFETIME_S = 60;

export interface RegistryClientOptions {
  readonly userAgent?: string;
  /** Per request: until the response headers (and, for manifests and tokens, the whole body); also the idle time allowed between two chunks of a blob body. Default 30 s. */
  readonly timeoutMs?: number;
  /** Largest manifest (and token response) accepted. Default 4 MiB. */
  readonly maxManifestBytes?: number;
  /** Retries after the first attempt on 429, 5xx and connection failures. Default 4. */
  readonly retries?: number;
  /** First backoff delay; doubled per retry, with jitter. Default 200 ms. */
  readonly baseBackoffMs?: number;
  /** Cap of a backoff delay, and of a wait that `Retry-After` asks for. Default 10 s. */
  readonly maxBackoffMs?: number;
  /** Clock for token expiry and `Retry-After` dates (tests). */
  readonly now?: () => number;
  /** Waits between attempts (tests record the delays). Must reject when `signal` aborts. */
  readonly sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  /** Random source in [0, 1) for the jitter (tests). */
  readonly random?: () => number;
}

/** Uploads, in the same client: used by test fixtures and later tooling. */
export interface RegistryPusher {
  /** Uploads a blob unless the repository has it (HEAD first); POST, then a monolithic PUT. */
  pushBlob(ref: ImageReference, data: Buffer | Readable, digest: string, access: RegistryAccess, options?: RequestOptions): Promise<void>;
  /** Puts a manifest under `ref`'s tag (or digest); returns the manifest digest (sha256). */
  pushManifest(ref: ImageReference, manifest: Buffer, mediaType: string, access: RegistryAccess, options?: RequestOptions): Promise<string>;
  /**
   * Mounts blob `digest` of repository `from` into repository `target` of the same registry,
   * without moving its bytes (`POST /v2/<target>/blobs/uploads/?mount=<digest>&from=<from>`).
   * True when the registry mounted it (201); false when it started an upload instead (202: it
   * does not have the blob in `from`, or does not mount across repositories), which is then
   * cancelled, and the caller copies the blob. `access` must grant pull on `from` and push on
   * `target`.
   */
  mountBlob(target: ImageReference, from: ImageReference, digest: string, access: RegistryAccess, options?: RequestOptions): Promise<boolean>;
}

export interface RegistryHttpClient extends RegistryClient, RegistryPusher {
  /** Closes the cached connections. */
  close(): Promise<void>;
}

/** One registry repository as addressed by a call. */
interface Target {
  /** Registry host as in the reference (for messages and credentials), e.g. `docker.io`. */
  readonly registry: string;
  /** Base URL of the API host, e.g. `https://registry-1.docker.io`. */
  readonly base: string;
  readonly path: string;
  readonly access: RegistryAccess;
  readonly auth: RegistryAuth | undefined;
  /** Identifies the credentials in cache keys, without holding them. */
  readonly credKey: string;
}

interface Call {
  readonly method: 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  readonly url: string;
  readonly headers?: Record<string, string>;
  readonly body?: Buffer | string | Readable;
  /** `repository:<path>:pull` etc. */
  readonly scope: string;
  /** What is asked for, for messages: `manifest "v1" of repository "x"`. */
  readonly what: string;
  /** Abort the whole exchange (body included) after timeoutMs; false for blob bodies. */
  readonly wholeTimeout: boolean;
  readonly followRedirects: boolean;
}

interface Challenge {
  readonly scheme: string;
  readonly params: Readonly<Record<string, string>>;
}

interface CachedToken {
  readonly token: string;
  readonly expiresAt: number;
}

interface Exchange {
  readonly res: Dispatcher.ResponseData;
  /** Signal to read the body under (includes the whole-exchange timeout when set). */
  readonly signal: AbortSignal;
  readonly timeout: AbortSignal | undefined;
  readonly caller: AbortSignal | undefined;
}

interface Manifest {
  readonly bytes: Buffer;
  readonly digest: string;
  readonly mediaType: string;
  readonly json: Record<string, unknown>;
}

interface IndexEntry {
  readonly descriptor: Descriptor;
  readonly platform?: Platform;
}

export function createRegistryClient(options: RegistryClientOptions = {}): RegistryHttpClient {
  const userAgent = options.userAgent ?? 'kmm-preflight/0.1';
  const timeoutMs = options.timeoutMs ?? 30_000;
  const maxManifestBytes = options.maxManifestBytes ?? 4 * 1024 * 1024;
  const retries = Math.max(0, options.retries ?? 4);
  const baseBackoffMs = options.baseBackoffMs ?? 200;
  const maxBackoffMs = options.maxBackoffMs ?? 10_000;
  const now = options.now ?? Date.now;
  const sleep = options.sleep ?? ((ms: number, signal?: AbortSignal) => sleepTimer(ms, undefined, signal ? { signal } : undefined));
  const random = options.random ?? Math.random;

  const agents = new Map<string, Agent>();
  const tokens = new Map<string, CachedToken>();
  /** registry|credKey of registries that answered with a Basic challenge. */
  const basicRegistries = new Set<string>();
  let bytesReceived = 0;

  // ---------------------------------------------------------------------------------------
  // Connections

  function agentFor(url: URL, access: RegistryAccess): Agent {
    const skipVerify = access.insecureSkipTLSVerify === true;
    const cas = access.caCertificates ?? [];
    const caKey = cas.length === 0 ? '-' : createHash('sha256').update(cas.join('\n')).digest('hex');
    const key = `${url.protocol}//${url.host}|${skipVerify}|${caKey}`;
    let agent = agents.get(key);
    if (agent === undefined) {
      agent = new Agent({
        connect: {
          timeout: timeoutMs,
          // Extra CAs add to the public roots (a bare `ca` would replace them).
          ...(cas.length > 0 ? { ca: [...rootCertificates, ...cas] } : {}),
          ...(skipVerify ? { rejectUnauthorized: false } : {}),
        },
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
        keepAliveTimeout: 30_000,
      });
      agents.set(key, agent);
    }
    return agent;
  }

  function target(refIn: ImageReference, access: RegistryAccess): Target {
    const registry = refIn.domain;
    const apiHost = registry === 'docker.io' ? 'registry-1.docker.io' : registry;
    const auth = findRegistryAuth(access.credentials, registry);
    const credKey = hasCredentials(auth) ? createHash('sha256').update(JSON.stringify(auth)).digest('hex').slice(0, 32) : 'anonymous';
    return { registry, base: `${access.insecure ? 'http' : 'https'}://${apiHost}`, path: refIn.path, access, auth, credKey };
  }

  // ---------------------------------------------------------------------------------------
  // One HTTP exchange, redirects followed

  async function dispatchOnce(call: Call, access: RegistryAccess, authorization: string | undefined, signal: AbortSignal, registry: string) {
    let url = new URL(call.url);
    const origin = url.origin;
    let method = call.method;
    let body = call.body;
    for (let redirects = 0; ; redirects++) {
      const headers: Record<string, string> = { 'user-agent': userAgent, ...(call.headers ?? {}) };
      // Credentials go to the registry's origin only, never to the storage a redirect points at.
      if (authorization !== undefined && url.origin === origin) headers['authorization'] = authorization;
      const res = await undiciRequest(url, {
        method,
        headers,
        ...(body !== undefined ? { body } : {}),
        signal,
        dispatcher: agentFor(url, access),
        headersTimeout: timeoutMs,
        bodyTimeout: timeoutMs,
      });
      const location = res.headers['location'];
      const isRedirect = [301, 302, 303, 307, 308].includes(res.statusCode) && typeof location === 'string';
      if (!call.followRedirects || !isRedirect || (method !== 'GET' && method !== 'HEAD')) return res;
      res.body.resume();
      if (redirects >= MAX_REDIRECTS) {
        throw new RegistryError('Invalid', registry, `registry ${registry} redirected ${call.what} more than ${MAX_REDIRECTS} times`);
      }
      const next = new URL(location, url);
      if (next.protocol !== 'https:' && next.protocol !== 'http:') {
        throw new RegistryError('Invalid', registry, `registry ${registry} redirected ${call.what} to an unsupported URL scheme ${next.protocol}`);
      }
      if (url.protocol === 'https:' && next.protocol === 'http:' && !access.insecure) {
        throw new RegistryError('Invalid', registry, `registry ${registry} redirected ${call.what} from HTTPS to plain HTTP at ${next.host}, which is refused unless the registry is marked insecure`);
      }
      url = next;
      if (res.statusCode === 303) {
        method = 'GET';
        body = undefined;
      }
    }
  }

  // ---------------------------------------------------------------------------------------
  // Retries and auth

  /**
   * Sends `call` with retries, authenticating on a 401 when `t` is a repository target. Returns
   * the response for every status but 429 and 5xx (→ retried, then RateLimited / ServerError)
   * and, for a repository target, 401/403 (→ Unauthorized); the caller reads or discards the body.
   */
  async function send(call: Call, t: Target | { registry: string; access: RegistryAccess }, callerSignal: AbortSignal | undefined): Promise<Exchange> {
    const registry = t.registry;
    const withAuth = 'path' in t ? t : undefined;
    const replayable = !(call.body instanceof Readable);
    const maxAttempts = replayable ? retries + 1 : 1;
    let attempt = 0;
    let challenged = false;
    let freshAuth = false;
    for (;;) {
      callerSignal?.throwIfAborted();
      const timeout = AbortSignal.timeout(timeoutMs);
      const attemptSignal = call.wholeTimeout ? (callerSignal ? AbortSignal.any([callerSignal, timeout]) : timeout) : (callerSignal ?? new AbortController().signal);
      const authorization = withAuth ? cachedAuthorization(withAuth, call.scope) : undefined;
      let res: Dispatcher.ResponseData;
      try {
        res = await dispatchOnce(call, t.access, authorization, attemptSignal, registry);
      } catch (err) {
        if (err instanceof RegistryError) throw err;
        const failure = classifyFailure(err, callerSignal, call.wholeTimeout ? timeout : undefined, registry, call.what, t.access);
        attempt++;
        if (failure.retryable && attempt < maxAttempts) {
          await pause(backoffDelay(attempt), callerSignal);
          continue;
        }
        throw attempt > 1 ? withAttempts(failure.error, attempt) : failure.error;
      }
      const status = res.statusCode;

      if (status === 401 && withAuth) {
        const errorBody = await readErrorBody(res, callerSignal);
        const challenges = parseChallenges(headerValue(res.headers['www-authenticate']));
        // Once per call: a cached token may have expired early, so it is thrown away and the
        // challenge answered again; a second 401 after fresh credentials is final.
        if (!challenged && replayable) {
          challenged = true;
          forgetAuthorization(withAuth, call.scope);
          const handled = await answerChallenge(withAuth, call, challenges, callerSignal);
          if (handled) {
            freshAuth = true;
            continue;
          }
        }
        throw unauthorized(withAuth, call, status, freshAuth || authorization !== undefined, errorBody);
      }
      if ((status === 401 || status === 403) && withAuth) {
        const errorBody = await readErrorBody(res, callerSignal);
        throw unauthorized(withAuth, call, status, freshAuth || authorization !== undefined, errorBody);
      }
      if (status === 429 || (status >= 500 && status !== 501 && status !== 505)) {
        const errorBody = await readErrorBody(res, callerSignal);
        attempt++;
        if (attempt < maxAttempts) {
          const retryAfter = status === 429 || status === 503 ? parseRetryAfter(headerValue(res.headers['retry-after'])) : undefined;
          await pause(retryAfter !== undefined ? Math.min(retryAfter, maxBackoffMs) : backoffDelay(attempt), callerSignal);
          continue;
        }
        const tries = attempt === 1 ? 'once' : `${attempt} times`;
        if (status === 429) {
          throw new RegistryError('RateLimited', registry, `registry ${registry} rate-limited ${call.what} (HTTP 429, asked ${tries}); retry later or use credentials with a higher pull limit`);
        }
        throw new RegistryError('ServerError', registry, `registry ${registry} failed with HTTP ${status} on ${call.what} (asked ${tries})${errorCodeSuffix(errorBody)}`);
      }
      return { res, signal: attemptSignal, timeout: call.wholeTimeout ? timeout : undefined, caller: callerSignal };
    }
  }

  async function pause(ms: number, signal: AbortSignal | undefined): Promise<void> {
    try {
      await sleep(ms, signal);
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw err;
    }
  }

  function backoffDelay(attempt: number): number {
    const exp = Math.min(maxBackoffMs, baseBackoffMs * 2 ** Math.max(0, attempt - 1));
    // "Equal jitter": half fixed, half random, so retries of many clients spread out.
    return Math.round(exp / 2 + (exp / 2) * random());
  }

  function parseRetryAfter(value: string | undefined): number | undefined {
    if (value === undefined) return undefined;
    const trimmed = value.trim();
    if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
    const date = Date.parse(trimmed);
    if (Number.isNaN(date)) return undefined;
    return Math.max(0, date - now());
  }

  function tokenKey(t: Target, scope: string): string {
    return `${t.registry}|${scope}|${t.credKey}`;
  }

  function cachedAuthorization(t: Target, scope: string): string | undefined {
    if (t.auth?.registryToken !== undefined) return `Bearer ${t.auth.registryToken}`;
    const cached = tokens.get(tokenKey(t, scope));
    if (cached !== undefined) {
      if (cached.expiresAt > now()) return `Bearer ${cached.token}`;
      tokens.delete(tokenKey(t, scope));
    }
    if (basicRegistries.has(`${t.registry}|${t.credKey}`)) return basicAuthorization(t.auth);
    return undefined;
  }

  function forgetAuthorization(t: Target, scope: string): void {
    tokens.delete(tokenKey(t, scope));
  }

  /** Obtains what `challenges` ask for; false when nothing can be sent (→ Unauthorized). */
  async function answerChallenge(t: Target, call: Call, challenges: readonly Challenge[], signal: AbortSignal | undefined): Promise<boolean> {
    if (t.auth?.registryToken !== undefined) return false; // it was sent and refused
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    if (bearer !== undefined) {
      const token = await fetchToken(t, call, bearer, signal);
      rememberToken(tokenKey(t, call.scope), token);
      return true;
    }
    const basic = challenges.find((c) => c.scheme === 'basic');
    if (basic !== undefined && basicAuthorization(t.auth) !== undefined) {
      basicRegistries.add(`${t.registry}|${t.credKey}`);
      return true;
    }
    return false;
  }

  function rememberToken(key: string, token: CachedToken): void {
    if (tokens.size >= MAX_CACHED_TOKENS) {
      const at = now();
      for (const [k, v] of tokens) if (v.expiresAt <= at) tokens.delete(k);
      // Still full: drop the oldest entries (Map keeps insertion order).
      for (const k of tokens.keys()) {
        if (tokens.size < MAX_CACHED_TOKENS) break;
        tokens.delete(k);
      }
    }
    tokens.set(key, token);
  }

  async function fetchToken(t: Target, call: Call, challenge: Challenge, signal: AbortSignal | undefined): Promise<CachedToken> {
    const realmText = challenge.params['realm'];
    let realm: URL;
    try {
      realm = new URL(realmText ?? '');
    } catch {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} asked for a bearer token without a valid realm URL`);
    }
    if (realm.protocol !== 'https:' && realm.protocol !== 'http:') {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} named a token realm with the unsupported scheme ${realm.protocol}`);
    }
    const service = challenge.params['service'];
    // A call may need several scopes (a mount: pull on the source, push on the target), and a
    // challenge lists several separated by spaces; each goes as its own `scope` parameter.
    const scopes = call.scope.split(' ').filter((s) => s !== '');
    for (const s of (challenge.params['scope'] ?? '').split(' ')) if (s !== '' && !scopes.includes(s)) scopes.push(s);
    const what = `a token from ${realm.host} for ${call.what}`;
    const tokenCall = (method: 'GET' | 'POST', headers: Record<string, string>, body?: string, url?: URL): Call => ({
      method,
      url: (url ?? realm).toString(),
      headers,
      ...(body !== undefined ? { body } : {}),
      scope: call.scope,
      what,
      wholeTimeout: true,
      followRedirects: true,
    });
    const auth = t.auth;
    let ex: Exchange | undefined;
    if (auth?.identityToken !== undefined) {
      const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: auth.identityToken, client_id: 'kmm-preflight' });
      if (service !== undefined) form.set('service', service);
      for (const s of scopes) form.append('scope', s);
      ex = await send(tokenCall('POST', { 'content-type': 'application/x-www-form-urlencoded' }, form.toString()), { registry: t.registry, access: t.access }, signal);
      if (ex.res.statusCode === 404 || ex.res.statusCode === 405) {
        // A token server without the OAuth2 POST endpoint: fall back to GET, as containerd does.
        ex.res.body.resume();
        ex = undefined;
      }
    }
    if (ex === undefined) {
      const url = new URL(realm);
      if (service !== undefined) url.searchParams.set('service', service);
      for (const s of scopes) url.searchParams.append('scope', s);
      if (auth?.username !== undefined) url.searchParams.set('account', auth.username);
      const basic = basicAuthorization(auth);
      const headers: Record<string, string> = basic !== undefined ? { authorization: basic } : {};
      ex = await send(tokenCall('GET', headers, undefined, url), { registry: t.registry, access: t.access }, signal);
    }
    const status = ex.res.statusCode;
    if (status === 401 || status === 403) {
      await readErrorBody(ex.res, ex.caller);
      const sent = hasCredentials(auth);
      throw new RegistryError(
        'Unauthorized',
        t.registry,
        sent
          ? `the token service ${realm.host} of registry ${t.registry} refused the credentials from the pull secret (HTTP ${status})`
          : `the token service ${realm.host} of registry ${t.registry} refused anonymous access (HTTP ${status}); no credentials were sent${noCredentialsHint(t)}`,
      );
    }
    if (status !== 200) {
      const body = await readErrorBody(ex.res, ex.caller);
      throw new RegistryError('Invalid', t.registry, `the token service ${realm.host} of registry ${t.registry} answered HTTP ${status}${errorCodeSuffix(body)}`);
    }
    const bytes = await readLimited(ex, t.registry, `the token response of ${realm.host}`, maxManifestBytes);
    let doc: unknown;
    try {
      doc = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new RegistryError('Invalid', t.registry, `the token service ${realm.host} of registry ${t.registry} answered with a body that is not JSON`);
    }
    const obj = (typeof doc === 'object' && doc !== null ? doc : {}) as Record<string, unknown>;
    const token = typeof obj['token'] === 'string' && obj['token'] !== '' ? obj['token'] : obj['access_token'];
    if (typeof token !== 'string' || token === '') {
      throw new RegistryError('Invalid', t.registry, `the token service ${realm.host} of registry ${t.registry} answered without a token`);
    }
    const expiresIn = typeof obj['expires_in'] === 'number' && obj['expires_in'] > 0 ? obj['expires_in'] : DEFAULT_TOKEN_LIFETIME_S;
    const lifetimeMs = Math.max(DEFAULT_TOKEN_LIFETIME_S, expiresIn) * 1000;
    return { token, expiresAt: now() + lifetimeMs - TOKEN_EXPIRY_MARGIN_MS };
  }

  function unauthorized(t: Target, call: Call, status: number, credentialsSent: boolean, errorBody: Buffer | undefined): RegistryError {
    const code = errorCodeSuffix(errorBody);
    if (credentialsSent && hasCredentials(t.auth)) {
      return new RegistryError(
        'Unauthorized',
        t.registry,
        `registry ${t.registry} refused ${call.what} with the credentials from the pull secret (HTTP ${status}${code ? `, ${code.slice(2)}` : ''}); check that they grant ${scopeVerb(call.scope)} access to repository "${t.path}"`,
      );
    }
    return new RegistryError(
      'Unauthorized',
      t.registry,
      `registry ${t.registry} refused ${call.what} to an anonymous client (HTTP ${status}${code ? `, ${code.slice(2)}` : ''}): the repository may be private or not exist, and no credentials were sent${noCredentialsHint(t)}`,
    );
  }

  // ---------------------------------------------------------------------------------------
  // Bodies

  async function readLimited(ex: Exchange, registry: string, what: string, limit: number): Promise<Buffer> {
    const length = Number(headerValue(ex.res.headers['content-length']) ?? NaN);
    if (Number.isFinite(length) && length > limit) {
      discard(ex.res.body);
      throw new RegistryError('TooLarge', registry, `${what} from registry ${registry} is ${length} bytes, over the limit of ${limit} bytes`);
    }
    const chunks: Buffer[] = [];
    let total = 0;
    try {
      for await (const chunk of ex.res.body as AsyncIterable<Buffer>) {
        total += chunk.length;
        bytesReceived += chunk.length;
        if (total > limit) {
          discard(ex.res.body);
          throw new RegistryError('TooLarge', registry, `${what} from registry ${registry} is over the limit of ${limit} bytes`);
        }
        chunks.push(chunk);
      }
    } catch (err) {
      if (err instanceof RegistryError) throw err;
      throw classifyFailure(err, ex.caller, ex.timeout, registry, what, { insecure: true }).error;
    }
    return Buffer.concat(chunks);
  }

  /** Reads (a bounded part of) an error body for its codes; a failure to read it is ignored. */
  async function readErrorBody(res: Dispatcher.ResponseData, callerSignal: AbortSignal | undefined): Promise<Buffer | undefined> {
    const chunks: Buffer[] = [];
    let total = 0;
    try {
      for await (const chunk of res.body as AsyncIterable<Buffer>) {
        bytesReceived += chunk.length;
        if (total < ERROR_BODY_LIMIT) chunks.push(chunk);
        total += chunk.length;
        if (total > 16 * ERROR_BODY_LIMIT) {
          discard(res.body);
          break;
        }
      }
    } catch {
      if (callerSignal?.aborted) throw callerSignal.reason;
      return undefined;
    }
    return Buffer.concat(chunks).subarray(0, ERROR_BODY_LIMIT);
  }

  // ---------------------------------------------------------------------------------------
  // Manifests

  async function fetchManifest(t: Target, reference: string, byDigest: boolean, signal: AbortSignal | undefined): Promise<Manifest> {
    const what = byDigest ? `manifest ${reference} of repository "${t.path}"` : `tag "${reference}" of repository "${t.path}"`;
    const ex = await send(
      {
        method: 'GET',
        url: `${t.base}/v2/${t.path}/manifests/${reference}`,
        headers: { accept: MANIFEST_ACCEPT },
        scope: `repository:${t.path}:pull`,
        what,
        wholeTimeout: true,
        followRedirects: true,
      },
      t,
      signal,
    );
    const status = ex.res.statusCode;
    if (status === 404) {
      const body = await readErrorBody(ex.res, ex.caller);
      const codes = registryErrorCodes(body);
      // Distribution answers MANIFEST_UNKNOWN for a tag of a repository that does not exist
      // either; the tag list tells the two apart (NAME_UNKNOWN).
      if (!byDigest && !codes.includes('NAME_UNKNOWN') && (await repositoryMissing(t, signal))) {
        throw notFound(t, Buffer.from(JSON.stringify({ errors: [{ code: 'NAME_UNKNOWN' }] })), 'tag', reference);
      }
      throw notFound(t, body, byDigest ? 'manifest' : 'tag', reference);
    }
    if (status !== 200) {
      const body = await readErrorBody(ex.res, ex.caller);
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} answered HTTP ${status} to ${what}${errorCodeSuffix(body)}`);
    }
    const contentType = (headerValue(ex.res.headers['content-type']) ?? '').split(';')[0]!.trim().toLowerCase();
    const headerDigest = headerValue(ex.res.headers['docker-content-digest'])?.trim();
    const bytes = await readLimited(ex, t.registry, `the ${what}`, maxManifestBytes);

    let digest: string;
    if (byDigest) {
      digest = reference;
      const actual = computeDigest(reference, bytes, t.registry);
      if (actual !== reference) {
        throw new RegistryError('DigestMismatch', t.registry, `registry ${t.registry} served ${what} with content whose digest is ${actual}`);
      }
    } else if (headerDigest !== undefined && DIGEST_RE.test(headerDigest)) {
      const actual = computeDigest(headerDigest, bytes, t.registry);
      if (actual !== headerDigest) {
        throw new RegistryError('DigestMismatch', t.registry, `registry ${t.registry} served ${what} as ${headerDigest} but its content has the digest ${actual}`);
      }
      digest = headerDigest;
    } else {
      digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
    }

    let json: unknown;
    try {
      json = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} served ${what} that is not JSON`);
    }
    if (typeof json !== 'object' || json === null || Array.isArray(json)) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} served ${what} that is not a JSON object`);
    }
    const doc = json as Record<string, unknown>;
    const declared = typeof doc['mediaType'] === 'string' ? doc['mediaType'] : undefined;
    if (doc['schemaVersion'] === 1 || SCHEMA1_TYPES.has(declared ?? '') || (declared === undefined && (contentType === MEDIA_TYPES.dockerSchema1 || contentType === MEDIA_TYPES.dockerSchema1Signed))) {
      throw new RegistryError(
        'Invalid',
        t.registry,
        `registry ${t.registry} served ${what} as a Docker schema 1 manifest, which is deprecated and not supported; push the image again with a current tool (Docker v2 schema 2 or OCI)`,
      );
    }
    if (doc['schemaVersion'] !== 2) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} served ${what} with schemaVersion ${JSON.stringify(doc['schemaVersion'])}, expected 2`);
    }
    let mediaType = declared;
    if (mediaType === undefined) {
      if (INDEX_TYPES.has(contentType) || IMAGE_TYPES.has(contentType)) mediaType = contentType;
      else mediaType = Array.isArray(doc['manifests']) ? MEDIA_TYPES.ociIndex : MEDIA_TYPES.ociManifest;
    }
    if (!INDEX_TYPES.has(mediaType) && !IMAGE_TYPES.has(mediaType)) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} served ${what} with the unsupported media type ${mediaType}`);
    }
    return { bytes, digest, mediaType, json: doc };
  }

  /** True only when the registry says the repository is unknown; any other answer or failure is false. */
  async function repositoryMissing(t: Target, signal: AbortSignal | undefined): Promise<boolean> {
    try {
      const ex = await send(
        {
          method: 'GET',
          url: `${t.base}/v2/${t.path}/tags/list?n=1`,
          scope: `repository:${t.path}:pull`,
          what: `the tags of repository "${t.path}"`,
          wholeTimeout: true,
          followRedirects: true,
        },
        t,
        signal,
      );
      const body = await readErrorBody(ex.res, ex.caller);
      return ex.res.statusCode === 404 && registryErrorCodes(body).includes('NAME_UNKNOWN');
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      return false;
    }
  }

  function notFound(t: Target, body: Buffer | undefined, kind: 'tag' | 'manifest' | 'blob', reference: string): RegistryError {
    const codes = registryErrorCodes(body);
    const repo = `repository "${t.path}"`;
    if (codes.includes('NAME_UNKNOWN')) {
      return new RegistryError('NotFound', t.registry, `${repo} does not exist on registry ${t.registry}`);
    }
    if (kind === 'blob') return new RegistryError('NotFound', t.registry, `registry ${t.registry} has no blob ${reference} in ${repo}`);
    if (kind === 'tag') {
      if (codes.includes('MANIFEST_UNKNOWN') || codes.includes('TAG_INVALID')) {
        return new RegistryError('NotFound', t.registry, `tag "${reference}" does not exist in ${repo} on registry ${t.registry}`);
      }
      return new RegistryError('NotFound', t.registry, `registry ${t.registry} has no tag "${reference}" in ${repo}, or no such repository`);
    }
    return new RegistryError('NotFound', t.registry, `registry ${t.registry} has no manifest ${reference} in ${repo}`);
  }

  async function resolveImage(refIn: ImageReference, access: RegistryAccess, platform: Platform, options: RequestOptions = {}): Promise<ResolvedImage> {
    const ref = withDefaultTag(refIn);
    const t = target(ref, access);
    const signal = options.signal;
    const top = ref.digest !== undefined ? await fetchManifest(t, ref.digest, true, signal) : await fetchManifest(t, ref.tag!, false, signal);
    let manifest = top;
    let chosenPlatform: Platform | undefined;
    for (let depth = 0; INDEX_TYPES.has(manifest.mediaType); depth++) {
      if (depth >= MAX_INDEX_DEPTH) {
        throw new RegistryError('Invalid', t.registry, `${ref.normalized} nests image indexes more than ${MAX_INDEX_DEPTH} deep`);
      }
      const entries = parseIndex(manifest.json, t.registry, ref.normalized);
      const chosen = selectPlatform(entries, platform);
      if (chosen === undefined) {
        const available = [...new Set(entries.filter((e) => e.platform && e.platform.os !== 'unknown').map((e) => formatPlatform(e.platform!)))];
        throw new RegistryError(
          'NoMatchingPlatform',
          t.registry,
          `${ref.normalized} has no image for ${formatPlatform(platform)}; it has ${available.length > 0 ? available.join(', ') : 'no platform-specific images'}`,
        );
      }
      chosenPlatform = chosen.platform;
      manifest = await fetchManifest(t, chosen.descriptor.digest, true, signal);
    }
    const { config, layers } = parseImageManifest(manifest.json, t.registry, ref.normalized);
    return {
      reference: ref,
      digest: manifest.digest,
      ...(manifest !== top ? { indexDigest: top.digest } : {}),
      mediaType: manifest.mediaType,
      config,
      layers,
      ...(chosenPlatform !== undefined ? { platform: chosenPlatform } : {}),
    };
  }

  // ---------------------------------------------------------------------------------------
  // Blobs

  async function openBlob(refIn: ImageReference, descriptor: Descriptor, access: RegistryAccess, options: RequestOptions = {}): Promise<Readable> {
    const t = target(refIn, access);
    if (!DIGEST_RE.test(descriptor.digest)) {
      throw new RegistryError('Invalid', t.registry, `blob digest "${descriptor.digest}" is not a sha256 or sha512 digest`);
    }
    if (!Number.isSafeInteger(descriptor.size) || descriptor.size < 0) {
      throw new RegistryError('Invalid', t.registry, `blob ${descriptor.digest} has an invalid size ${descriptor.size}`);
    }
    const what = `blob ${descriptor.digest} of repository "${t.path}"`;
    const ex = await send(
      {
        method: 'GET',
        url: `${t.base}/v2/${t.path}/blobs/${descriptor.digest}`,
        scope: `repository:${t.path}:pull`,
        what,
        wholeTimeout: false,
        followRedirects: true,
      },
      t,
      options.signal,
    );
    const status = ex.res.statusCode;
    if (status === 404) {
      const body = await readErrorBody(ex.res, ex.caller);
      throw notFound(t, body, 'blob', descriptor.digest);
    }
    if (status !== 200) {
      const body = await readErrorBody(ex.res, ex.caller);
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} answered HTTP ${status} to ${what}${errorCodeSuffix(body)}`);
    }
    const length = Number(headerValue(ex.res.headers['content-length']) ?? NaN);
    if (Number.isFinite(length) && length > descriptor.size) {
      discard(ex.res.body);
      throw new RegistryError('TooLarge', t.registry, `registry ${t.registry} serves ${what} with ${length} bytes, more than the ${descriptor.size} bytes its descriptor says`);
    }

    const source = ex.res.body;
    const verifier = new BlobVerifier(descriptor, t.registry, what, (n) => (bytesReceived += n));
    source.on('error', (err: unknown) => {
      if (verifier.destroyed) return;
      let mapped: unknown;
      try {
        mapped = classifyFailure(err, options.signal, undefined, t.registry, what, access).error;
      } catch (abortReason) {
        mapped = abortReason;
      }
      verifier.destroy(mapped as Error);
    });
    // Destroying the returned stream (or its failing) aborts the download.
    verifier.on('close', () => {
      if (!source.destroyed) source.destroy();
    });
    source.pipe(verifier);
    return verifier;
  }

  // ---------------------------------------------------------------------------------------
  // Pushes

  async function pushBlob(refIn: ImageReference, data: Buffer | Readable, digest: string, access: RegistryAccess, options: RequestOptions = {}): Promise<void> {
    const t = target(refIn, access);
    if (!DIGEST_RE.test(digest)) throw new RegistryError('Invalid', t.registry, `blob digest "${digest}" is not a sha256 or sha512 digest`);
    const scope = `repository:${t.path}:pull,push`;
    const what = `blob ${digest} of repository "${t.path}"`;
    const head = await send(
      { method: 'HEAD', url: `${t.base}/v2/${t.path}/blobs/${digest}`, scope, what, wholeTimeout: true, followRedirects: true },
      t,
      options.signal,
    );
    head.res.body.resume();
    if (head.res.statusCode === 200) {
      if (data instanceof Readable) data.destroy();
      return;
    }
    const start = await send(
      { method: 'POST', url: `${t.base}/v2/${t.path}/blobs/uploads/`, body: '', scope, what: `an upload to repository "${t.path}"`, wholeTimeout: true, followRedirects: false },
      t,
      options.signal,
    );
    const startBody = await readErrorBody(start.res, start.caller);
    const location = headerValue(start.res.headers['location']);
    if (start.res.statusCode === 404) throw notFound(t, startBody, 'blob', digest);
    if (start.res.statusCode !== 202 || location === undefined) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} answered HTTP ${start.res.statusCode} to starting ${what}${errorCodeSuffix(startBody)}`);
    }
    const uploadUrl = new URL(location, `${t.base}/v2/`);
    uploadUrl.searchParams.set('digest', digest);
    const put = await send(
      {
        method: 'PUT',
        url: uploadUrl.toString(),
        headers: {
          'content-type': 'application/octet-stream',
          ...(Buffer.isBuffer(data) ? { 'content-length': String(data.length) } : {}),
        },
        body: data,
        scope,
        what,
        wholeTimeout: Buffer.isBuffer(data),
        followRedirects: false,
      },
      t,
      options.signal,
    );
    const putBody = await readErrorBody(put.res, put.caller);
    if (put.res.statusCode !== 201 && put.res.statusCode !== 204) {
      const code: RegistryErrorCode = registryErrorCodes(putBody).includes('DIGEST_INVALID') ? 'DigestMismatch' : 'Invalid';
      throw new RegistryError(code, t.registry, `registry ${t.registry} answered HTTP ${put.res.statusCode} to uploading ${what}${errorCodeSuffix(putBody)}`);
    }
  }

  async function pushManifest(refIn: ImageReference, manifest: Buffer, mediaType: string, access: RegistryAccess, options: RequestOptions = {}): Promise<string> {
    const ref = withDefaultTag(refIn);
    const t = target(ref, access);
    const digest = `sha256:${createHash('sha256').update(manifest).digest('hex')}`;
    const reference = ref.tag ?? ref.digest!;
    const what = `manifest ${reference} of repository "${t.path}"`;
    const ex = await send(
      {
        method: 'PUT',
        url: `${t.base}/v2/${t.path}/manifests/${reference}`,
        headers: { 'content-type': mediaType, 'content-length': String(manifest.length) },
        body: manifest,
        scope: `repository:${t.path}:pull,push`,
        what,
        wholeTimeout: true,
        followRedirects: false,
      },
      t,
      options.signal,
    );
    const body = await readErrorBody(ex.res, ex.caller);
    if (ex.res.statusCode !== 201 && ex.res.statusCode !== 200 && ex.res.statusCode !== 204) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} answered HTTP ${ex.res.statusCode} to putting ${what}${errorCodeSuffix(body)}`);
    }
    return digest;
  }

  async function mountBlob(
    targetIn: ImageReference,
    fromIn: ImageReference,
    digest: string,
    access: RegistryAccess,
    options: RequestOptions = {},
  ): Promise<boolean> {
    const t = target(targetIn, access);
    if (!DIGEST_RE.test(digest)) throw new RegistryError('Invalid', t.registry, `blob digest "${digest}" is not a sha256 or sha512 digest`);
    if (fromIn.domain !== t.registry) {
      throw new RegistryError('Invalid', t.registry, `cannot mount blob ${digest} into registry ${t.registry} from another registry (${fromIn.domain})`);
    }
    const from = fromIn.path;
    // Pull on the source first: scopeVerb() names the last one (push) in an Unauthorized message.
    const scope = `repository:${from}:pull repository:${t.path}:pull,push`;
    const what = `mounting blob ${digest} from repository "${from}" into repository "${t.path}"`;
    const query = new URLSearchParams({ mount: digest, from });
    const ex = await send(
      { method: 'POST', url: `${t.base}/v2/${t.path}/blobs/uploads/?${query.toString()}`, body: '', scope, what, wholeTimeout: true, followRedirects: false },
      t,
      options.signal,
    );
    const body = await readErrorBody(ex.res, ex.caller);
    const status = ex.res.statusCode;
    if (status === 201) return true;
    if (status === 404) throw notFound(t, body, 'blob', digest);
    const location = headerValue(ex.res.headers['location']);
    if (status !== 202 || location === undefined) {
      throw new RegistryError('Invalid', t.registry, `registry ${t.registry} answered HTTP ${status} to ${what}${errorCodeSuffix(body)}`);
    }
    // An upload was started instead: cancel it, so it does not linger until the registry purges
    // it. A failure to cancel changes nothing for the caller, who uploads the blob anyway.
    try {
      const cancel = await send(
        {
          method: 'DELETE',
          url: new URL(location, `${t.base}/v2/`).toString(),
          scope,
          what: `cancelling an upload to repository "${t.path}"`,
          wholeTimeout: true,
          followRedirects: false,
        },
        t,
        options.signal,
      );
      await readErrorBody(cancel.res, cancel.caller);
    } catch (err) {
      if (options.signal?.aborted) throw options.signal.reason;
      if (!(err instanceof RegistryError)) throw err;
    }
    return false;
  }

  return {
    resolveImage,
    openBlob,
    pushBlob,
    pushManifest,
    mountBlob,
    get bytesReceived() {
      return bytesReceived;
    },
    async close() {
      const all = [...agents.values()];
      agents.clear();
      tokens.clear();
      // destroy, not close: a blob stream nobody reads would keep close() waiting.
      await Promise.all(all.map((a) => a.destroy().catch(() => undefined)));
    },
  };
}

// -------------------------------------------------------------------------------------------
// Blob verification

/**
 * Passes a blob through, hashing and counting it: errors with TooLarge as soon as more bytes than
 * the descriptor's size arrive, and with DigestMismatch at the end when size or digest differ.
 */
class BlobVerifier extends Transform {
  readonly #descriptor: Descriptor;
  readonly #registry: string;
  readonly #what: string;
  readonly #count: (n: number) => void;
  readonly #hash: Hash;
  #received = 0;

  constructor(descriptor: Descriptor, registry: string, what: string, count: (n: number) => void) {
    super();
    this.#descriptor = descriptor;
    this.#registry = registry;
    this.#what = what;
    this.#count = count;
    this.#hash = createHash(descriptor.digest.startsWith('sha512:') ? 'sha512' : 'sha256');
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.#count(chunk.length);
    this.#received += chunk.length;
    if (this.#received > this.#descriptor.size) {
      callback(
        new RegistryError('TooLarge', this.#registry, `registry ${this.#registry} sent more than the ${this.#descriptor.size} bytes the descriptor of ${this.#what} says`),
      );
      return;
    }
    this.#hash.update(chunk);
    callback(null, chunk);
  }

  override _flush(callback: TransformCallback): void {
    if (this.#received !== this.#descriptor.size) {
      callback(
        new RegistryError(
          'DigestMismatch',
          this.#registry,
          `registry ${this.#registry} sent ${this.#received} bytes of ${this.#what}, whose descriptor says ${this.#descriptor.size} bytes`,
        ),
      );
      return;
    }
    const algorithm = this.#descriptor.digest.slice(0, this.#descriptor.digest.indexOf(':'));
    const actual = `${algorithm}:${this.#hash.digest('hex')}`;
    if (actual !== this.#descriptor.digest) {
      callback(new RegistryError('DigestMismatch', this.#registry, `registry ${this.#registry} sent ${this.#what} with content whose digest is ${actual}`));
      return;
    }
    callback();
  }
}

// -------------------------------------------------------------------------------------------
// Helpers (exported for unit tests)

function computeDigest(expected: string, bytes: Buffer, registry: string): string {
  const colon = expected.indexOf(':');
  const algorithm = expected.slice(0, colon);
  if (algorithm !== 'sha256' && algorithm !== 'sha512') {
    throw new RegistryError('Invalid', registry, `digest algorithm "${algorithm}" is not supported (sha256 and sha512 are)`);
  }
  return `${algorithm}:${createHash(algorithm).update(bytes).digest('hex')}`;
}

/** Aborts a response body; the abort is not an error anyone needs to hear about. */
function discard(body: Readable): void {
  body.on('error', () => {});
  body.destroy();
}

function headerValue(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}

function scopeVerb(scope: string): string {
  return scope.endsWith(':pull') ? 'pull' : 'push';
}

function noCredentialsHint(t: Target): string {
  if (hasCredentials(t.auth)) return '';
  if (t.access.credentials === undefined) return ' (no pull secret was given)';
  return ` (the pull secret has no entry for ${t.registry})`;
}

/** The `errors[].code` values of a distribution error body. */
export function registryErrorCodes(body: Buffer | undefined): string[] {
  if (body === undefined || body.length === 0) return [];
  try {
    const doc = JSON.parse(body.toString('utf8')) as { errors?: { code?: unknown }[] };
    return Array.isArray(doc.errors) ? doc.errors.map((e) => e?.code).filter((c): c is string => typeof c === 'string') : [];
  } catch {
    return [];
  }
}

function errorCodeSuffix(body: Buffer | undefined): string {
  const codes = registryErrorCodes(body).filter((c) => /^[A-Z_]{1,64}$/.test(c));
  return codes.length > 0 ? ` (${codes.join(', ')})` : '';
}

function withAttempts(error: RegistryError, attempts: number): RegistryError {
  return new RegistryError(error.code, error.registry, `${error.message} (after ${attempts} attempts)`, { cause: error.cause });
}

const RETRYABLE_NETWORK = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
]);
const TIMEOUT_CODES = new Set(['UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'UND_ERR_CONNECT_TIMEOUT', 'ETIMEDOUT']);

function errorCode(err: unknown): string | undefined {
  let e: unknown = err;
  for (let i = 0; i < 4 && typeof e === 'object' && e !== null; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

function isTlsFailure(code: string | undefined, message: string): boolean {
  if (code === undefined) return /certificate|ssl|tls/i.test(message);
  return (
    code.startsWith('ERR_TLS_') ||
    code.startsWith('ERR_SSL_') ||
    code.includes('CERT') ||
    code.startsWith('UNABLE_TO_') ||
    code === 'EPROTO' ||
    code === 'HOSTNAME_MISMATCH'
  );
}

const UNTRUSTED_CERT_CODES = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_UNTRUSTED',
]);

/** A TLS failure in words a person can act on (OpenSSL's own text is a last resort). */
function describeTlsFailure(code: string | undefined, message: string, access: RegistryAccess): string {
  if (code === 'ERR_SSL_WRONG_VERSION_NUMBER' || code === 'EPROTO' || code === 'ERR_SSL_PACKET_LENGTH_TOO_LONG') {
    return 'the server does not speak TLS; if the registry serves plain HTTP, mark it insecure';
  }
  if (code !== undefined && UNTRUSTED_CERT_CODES.has(code)) {
    const given = (access.caCertificates?.length ?? 0) > 0;
    return `its certificate is not signed by a trusted CA (${code})${given ? ', not even by the CA certificates given' : ''}; give the registry's CA certificate, or skip verification with insecureSkipTLSVerify`;
  }
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID' || code === 'HOSTNAME_MISMATCH') return `its certificate is not valid for this host name (${code})`;
  if (code === 'CERT_HAS_EXPIRED') return 'its certificate has expired';
  if (code === 'CERT_NOT_YET_VALID') return 'its certificate is not valid yet';
  const firstLine = message.split('\n')[0]!.replace(/^[0-9A-F]+:error:[0-9A-F]+:/, '').trim();
  return code !== undefined ? `${firstLine} (${code})` : firstLine;
}

/**
 * Maps a failed exchange to a RegistryError, and whether it is worth another attempt. Rethrows
 * the caller's abort reason when the caller aborted.
 */
function classifyFailure(
  err: unknown,
  callerSignal: AbortSignal | undefined,
  timeout: AbortSignal | undefined,
  registry: string,
  what: string,
  access: RegistryAccess,
): { error: RegistryError; retryable: boolean } {
  if (callerSignal?.aborted) throw callerSignal.reason;
  if (timeout?.aborted || TIMEOUT_CODES.has(errorCode(err) ?? '')) {
    return {
      error: new RegistryError('Timeout', registry, `registry ${registry} did not answer ${what} in time`, { cause: err }),
      retryable: true,
    };
  }
  const code = errorCode(err);
  const message = err instanceof Error ? err.message : String(err);
  if (isTlsFailure(code, message)) {
    return {
      error: new RegistryError('Unreachable', registry, `the TLS connection to registry ${registry} failed: ${describeTlsFailure(code, message, access)}`, { cause: err }),
      retryable: false,
    };
  }
  if (code === 'ENOTFOUND') {
    return { error: new RegistryError('Unreachable', registry, `registry host ${registry} is not found in DNS`, { cause: err }), retryable: false };
  }
  const reason = code === 'ECONNREFUSED' ? 'the connection was refused' : code === 'ECONNRESET' || code === 'UND_ERR_SOCKET' ? 'the connection was reset' : message;
  return {
    error: new RegistryError('Unreachable', registry, `registry ${registry} could not be reached for ${what}: ${reason}`, { cause: err }),
    retryable: code !== undefined && RETRYABLE_NETWORK.has(code),
  };
}

/**
 * Parses `WWW-Authenticate` into challenges (scheme lower-cased, parameter names lower-cased,
 * quoted values unescaped), e.g. `Bearer realm="https://auth",service="reg",scope="repository:x:pull"`.
 */
export function parseChallenges(header: string | undefined): Challenge[] {
  const out: { scheme: string; params: Record<string, string> }[] = [];
  if (header === undefined) return out;
  const s = header;
  let i = 0;
  const skipWs = () => {
    while (i < s.length && (s[i] === ' ' || s[i] === '\t' || s[i] === ',')) i++;
  };
  const readToken = () => {
    const start = i;
    while (i < s.length && /[A-Za-z0-9!#$%&'*+.^_`|~\-/]/.test(s[i]!)) i++;
    return s.slice(start, i);
  };
  while (i < s.length) {
    skipWs();
    const token = readToken();
    if (token === '') {
      i++;
      continue;
    }
    let j = i;
    while (j < s.length && (s[j] === ' ' || s[j] === '\t')) j++;
    if (s[j] === '=' && out.length > 0 && s[j + 1] !== '=') {
      i = j + 1;
      while (i < s.length && (s[i] === ' ' || s[i] === '\t')) i++;
      let value = '';
      if (s[i] === '"') {
        i++;
        while (i < s.length && s[i] !== '"') {
          if (s[i] === '\\' && i + 1 < s.length) i++;
          value += s[i];
          i++;
        }
        i++;
      } else {
        const start = i;
        while (i < s.length && s[i] !== ',' && s[i] !== ' ' && s[i] !== '\t') i++;
        value = s.slice(start, i);
      }
      out[out.length - 1]!.params[token.toLowerCase()] = value;
    } else {
      out.push({ scheme: token.toLowerCase(), params: {} });
    }
  }
  return out;
}

function basicAuthorization(auth: RegistryAuth | undefined): string | undefined {
  if (auth === undefined || (auth.username === undefined && auth.password === undefined)) return undefined;
  return `Basic ${Buffer.from(`${auth.username ?? ''}:${auth.password ?? ''}`, 'utf8').toString('base64')}`;
}

function parseDescriptor(value: unknown, registry: string, where: string): Descriptor {
  if (typeof value !== 'object' || value === null) throw new RegistryError('Invalid', registry, `${where} is not a descriptor object`);
  const d = value as Record<string, unknown>;
  if (typeof d['mediaType'] !== 'string' || d['mediaType'] === '') throw new RegistryError('Invalid', registry, `${where} has no mediaType`);
  if (typeof d['digest'] !== 'string' || !DIGEST_RE.test(d['digest'])) {
    throw new RegistryError('Invalid', registry, `${where} has a digest that is not a sha256 or sha512 digest`);
  }
  if (typeof d['size'] !== 'number' || !Number.isSafeInteger(d['size']) || d['size'] < 0) {
    throw new RegistryError('Invalid', registry, `${where} has an invalid size`);
  }
  return { mediaType: d['mediaType'], digest: d['digest'], size: d['size'] };
}

function parseIndex(doc: Record<string, unknown>, registry: string, name: string): IndexEntry[] {
  const manifests = doc['manifests'];
  if (!Array.isArray(manifests)) throw new RegistryError('Invalid', registry, `the image index of ${name} has no manifests list`);
  return manifests.map((m: unknown, i) => {
    const descriptor = parseDescriptor(m, registry, `entry ${i} of the image index of ${name}`);
    const p = (m as Record<string, unknown>)['platform'];
    if (typeof p === 'object' && p !== null) {
      const pr = p as Record<string, unknown>;
      if (typeof pr['os'] === 'string' && typeof pr['architecture'] === 'string') {
        const platform: Platform = {
          os: pr['os'],
          architecture: pr['architecture'],
          ...(typeof pr['variant'] === 'string' && pr['variant'] !== '' ? { variant: pr['variant'] } : {}),
        };
        return { descriptor, platform };
      }
    }
    return { descriptor };
  });
}

function parseImageManifest(doc: Record<string, unknown>, registry: string, name: string): { config: Descriptor; layers: Descriptor[] } {
  const config = parseDescriptor(doc['config'], registry, `the config of the manifest of ${name}`);
  const layers = doc['layers'];
  if (!Array.isArray(layers)) throw new RegistryError('Invalid', registry, `the manifest of ${name} has no layers list`);
  return { config, layers: layers.map((l: unknown, i) => parseDescriptor(l, registry, `layer ${i} of the manifest of ${name}`)) };
}

/**
 * Architecture and variant normalised as containerd's `platforms.Normalize`: `aarch64` is
 * `arm64` and its variant `v8` is the default (so `arm64` ≡ `arm64/v8`), `arm` defaults to `v7`,
 * `x86_64` is `amd64` (variant `v1` ≡ none), `i386` is `386`.
 */
export function normalizePlatform(p: Platform): { os: string; architecture: string; variant: string } {
  const os = p.os.toLowerCase();
  let architecture = p.architecture.toLowerCase();
  let variant = (p.variant ?? '').toLowerCase();
  switch (architecture) {
    case 'i386':
      architecture = '386';
      variant = '';
      break;
    case 'x86_64':
    case 'x86-64':
    case 'amd64':
      architecture = 'amd64';
      if (variant === 'v1') variant = '';
      break;
    case 'aarch64':
    case 'arm64':
      architecture = 'arm64';
      if (variant === '' || variant === '8' || variant === 'v8' || variant === 'v8.0') variant = 'v8';
      break;
    case 'armhf':
      architecture = 'arm';
      variant = 'v7';
      break;
    case 'armel':
      architecture = 'arm';
      variant = 'v6';
      break;
    case 'arm':
      if (variant === '') variant = 'v7';
      else if (/^[5-8]$/.test(variant)) variant = `v${variant}`;
      break;
  }
  return { os, architecture, variant };
}

/** The first index entry for `wanted` (os and architecture exact, variant after normalisation). */
export function selectPlatform<T extends { readonly platform?: Platform }>(entries: readonly T[], wanted: Platform): T | undefined {
  const w = normalizePlatform(wanted);
  return entries.find((e) => {
    if (e.platform === undefined) return false;
    const c = normalizePlatform(e.platform);
    return c.os === w.os && c.architecture === w.architecture && c.variant === w.variant;
  });
}

function formatPlatform(p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ''}`;
}
