/**
 * The app factory: a fastify instance serving the Kubernetes API for this server's resources,
 * discovery, OpenAPI, health and metrics. `build()` does not listen, so most tests use
 * `inject()`; `main` adds TLS and the socket.
 */
import { TLSSocket } from 'node:tls';
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify';
import type { Logger } from 'pino';
import YAML from 'yaml';
import type { KubeObject, ResourceDefinition } from '../api/resources.ts';
import { API_VERSION } from '../api/schema.ts';
import type { Authenticator, Authorizer, UserInfo } from '../auth/types.ts';
import type { Store } from '../storage/store.ts';
import {
  aggregatedDiscovery,
  apiGroup,
  apiGroupList,
  apiResourceList,
  coreVersions,
  emptyAggregatedDiscovery,
} from './discovery.ts';
import { ApiError, errors, successStatus, toApiError } from './errors.ts';
import type { ApiMetrics } from './metrics.ts';
import { negotiate, type Negotiated } from './negotiation.ts';
import { buildOpenApi } from './openapi.ts';
import { patchTypeOf } from './patch.ts';
import type {
  Decoded,
  FieldValidation,
  ListResult,
  RequestContext,
  ResourceRegistry,
  Subresource,
  WatchItem,
} from './registry.ts';
import { requestInfo, type RequestInfo } from './request-info.ts';
import { partialObjectMetadata, toTable, type IncludeObject } from './table.ts';

export const DEFAULT_BODY_LIMIT = 3 * 1024 * 1024;
const MIN_REQUEST_TIMEOUT_SECONDS = 1800;
const HEALTH_PATHS = new Set(['/healthz', '/livez', '/readyz']);

export interface BuildOptions {
  readonly registries: readonly ResourceRegistry[];
  readonly store: Store;
  readonly logger: Logger;
  readonly authenticator: Authenticator;
  readonly authorizer: Authorizer;
  readonly metrics: ApiMetrics;
  readonly version: string;
  readonly bodyLimit?: number;
  /** TLS options for fastify's https server; absent for inject()-only tests. */
  readonly https?: FastifyServerOptions & Record<string, unknown>;
  readonly now?: () => number;
  /** Extra health checks named in /readyz?verbose. */
  readonly readinessChecks?: ReadonlyMap<string, () => Promise<void>>;
  /**
   * Validating admission webhooks served beside the API (AdmissionReview v1 over POST): called by
   * kube-apiserver, which presents no user, so these paths skip authentication like /healthz.
   */
  readonly admission?: readonly AdmissionRoute[];
}

export interface AdmissionRoute {
  readonly path: string;
  /** Decides on a parsed body; `error` is an internal failure to log (the answer already fails closed). */
  review(body: unknown): { readonly status: number; readonly body: unknown; readonly error?: unknown };
}

declare module 'fastify' {
  interface FastifyRequest {
    kubeUser?: UserInfo;
    kubeInfo?: RequestInfo;
  }
}

type Query = Record<string, string | string[] | undefined>;

function one(q: Query, name: string): string | undefined {
  const v = q[name];
  return Array.isArray(v) ? v[v.length - 1] : v;
}

function bool(q: Query, name: string): boolean | undefined {
  const v = one(q, name);
  if (v === undefined) return undefined;
  if (v === 'true' || v === '1') return true;
  if (v === 'false' || v === '0' || v === '') return false;
  throw errors.badRequest(`invalid value "${v}" for query parameter ${name}: expected true or false`);
}

function int(q: Query, name: string): number | undefined {
  const v = one(q, name);
  if (v === undefined || v === '') return undefined;
  if (!/^-?\d+$/.test(v)) throw errors.badRequest(`invalid value "${v}" for query parameter ${name}: expected an integer`);
  return Number(v);
}

function dryRunOf(q: Query): boolean {
  const v = q['dryRun'];
  const values = v === undefined ? [] : Array.isArray(v) ? v : [v];
  for (const d of values) {
    if (d !== 'All') throw errors.badRequest(`invalid dry run value "${d}": the only supported value is All`);
  }
  return values.length > 0;
}

function fieldValidationOf(q: Query): FieldValidation {
  const v = one(q, 'fieldValidation');
  if (v === undefined || v === '') return 'Warn';
  if (v === 'Strict' || v === 'Warn' || v === 'Ignore') return v;
  throw errors.badRequest(`invalid fieldValidation value "${v}": supported values are Ignore, Warn and Strict`);
}

function contentTypeOf(req: FastifyRequest): string {
  return String(req.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase();
}

/** Parses a create/update body: JSON or YAML. */
function parseObjectBody(req: FastifyRequest): unknown {
  const ct = contentTypeOf(req);
  const raw = req.body instanceof Buffer ? req.body.toString('utf8') : '';
  if (raw.trim() === '') throw errors.badRequest('the request body is empty: an object is required');
  if (ct === 'application/json' || ct === '') return parseJson(raw);
  if (ct === 'application/yaml' || ct === 'application/x-yaml' || ct === 'text/yaml') return parseYaml(raw);
  throw errors.unsupportedMediaType(ct, ['application/json', 'application/yaml']);
}

function parseJson(raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch (err) {
    throw errors.badRequest(`the request body is not valid JSON: ${(err as Error).message}`);
  }
}

function parseYaml(raw: string): unknown {
  try {
    const docs = YAML.parseAllDocuments(raw);
    if (docs.length !== 1) throw new Error('exactly one document is expected');
    const doc = docs[0]!;
    if (doc.errors.length > 0) throw new Error(doc.errors[0]!.message);
    return doc.toJS({ maxAliasCount: 100 });
  } catch (err) {
    throw errors.badRequest(`the request body is not valid YAML: ${(err as Error).message}`);
  }
}

/**
 * Sends text with exactly this Content-Type: fastify rewrites the media-type parameters of string
 * JSON payloads (quoting them and adding a charset), which strict clients compare against.
 */
function sendText(reply: FastifyReply, code: number, contentType: string, body: string): void {
  void reply.code(code).header('content-type', contentType).send(Buffer.from(body, 'utf8'));
}

function warningHeader(warnings: readonly string[]): string[] {
  return [...new Set(warnings)].map((w) => `299 - ${JSON.stringify(w.replace(/[\r\n]+/g, ' '))}`);
}

export async function build(options: BuildOptions): Promise<FastifyInstance> {
  const { registries, store, logger, authenticator, authorizer, metrics } = options;
  const resources: ResourceDefinition[] = registries.map((r) => r.definition);
  const now = options.now ?? Date.now;
  const bodyLimit = options.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const openapi = buildOpenApi(resources, options.version);

  const app = Fastify({
    loggerInstance: logger,
    // Requests are logged once, at debug level, by the onResponse hook with their API attributes.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit,
    // A watch runs as long as the client wants; kube-apiserver has no idle timeout on it either.
    requestTimeout: 0,
    connectionTimeout: 0,
    keepAliveTimeout: 65_000,
    ...(options.https ? { https: options.https } : {}),
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: 500 },
    return503OnClosing: true,
  } as FastifyServerOptions);

  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit }, (_req, body, done) => done(null, body));

  // Errors become Status objects; fastify's own errors are mapped to their Kubernetes reasons.
  app.setErrorHandler((err: Error & { code?: string; statusCode?: number }, req, reply) => {
    let apiError: ApiError;
    if (err instanceof ApiError) apiError = err;
    else if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') apiError = errors.tooLarge(bodyLimit);
    else if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') apiError = errors.unsupportedMediaType(String(req.headers['content-type']), ['application/json']);
    else if (err.statusCode && err.statusCode >= 400 && err.statusCode < 500) apiError = errors.badRequest(err.message);
    else {
      apiError = toApiError(err);
      req.log.error({ err }, 'request failed');
    }
    sendStatus(reply, apiError);
  });

  app.setNotFoundHandler((req, reply) => {
    sendStatus(reply, new ApiError('NotFound', 'the server could not find the requested resource', { causes: [{ reason: 'UnexpectedServerResponse', message: '404 page not found' }] }));
    void req;
  });

  function sendStatus(reply: FastifyReply, e: ApiError): void {
    if (e.details?.retryAfterSeconds) reply.header('Retry-After', String(e.details.retryAfterSeconds));
    sendText(reply, e.code, 'application/json', JSON.stringify(e.toStatus()));
  }

  const admissionPaths = new Set((options.admission ?? []).map((r) => r.path));
  // Authentication and authorization, as kube-apiserver's filter chain; health needs neither.
  app.addHook('onRequest', async (req) => {
    const path = req.url.split('?')[0]!;
    req.kubeInfo = requestInfo(req.method, req.url);
    if (HEALTH_PATHS.has(path) || [...HEALTH_PATHS].some((h) => path.startsWith(`${h}/`))) return;
    if (req.method === 'POST' && admissionPaths.has(path)) return;
    const socket = req.raw.socket instanceof TLSSocket ? req.raw.socket : undefined;
    const authn = await authenticator.authenticate({ headers: req.headers, headersDistinct: req.raw.headersDistinct, socket });
    if (!authn.authenticated) {
      throw errors.unauthorized(
        authn.reason ? `Unauthorized: ${authn.reason}` : undefined,
      );
    }
    req.kubeUser = authn.user;
    const info = req.kubeInfo;
    const decision = await authorizer.authorize({
      user: authn.user,
      verb: info.verb,
      isResourceRequest: info.isResourceRequest,
      path: info.path,
      ...(info.apiGroup !== undefined ? { apiGroup: info.apiGroup } : {}),
      ...(info.apiVersion !== undefined ? { apiVersion: info.apiVersion } : {}),
      ...(info.resource !== undefined ? { resource: info.resource } : {}),
      ...(info.subresource !== undefined ? { subresource: info.subresource } : {}),
      ...(info.name !== undefined ? { name: info.name } : {}),
    });
    if (!decision.allowed) {
      if (info.isResourceRequest) {
        throw errors.forbidden(
          authn.user.username,
          info.verb,
          { group: info.apiGroup ?? '', resource: info.resource ?? '' },
          info.name,
          decision.reason,
        );
      }
      throw new ApiError('Forbidden', `forbidden: User "${authn.user.username}" cannot ${info.verb} path "${info.path}"${decision.reason ? `: ${decision.reason}` : ''}`);
    }
  });

  app.addHook('onResponse', async (req, reply) => {
    const info = req.kubeInfo;
    if (!info?.isResourceRequest || info.verb === 'watch') return;
    const labels = { verb: info.verb, resource: info.resource ?? '', subresource: info.subresource ?? '' };
    metrics.requests.inc({ ...labels, code: String(reply.statusCode) });
    metrics.requestDuration.observe({ verb: info.verb, resource: labels.resource }, reply.elapsedTime / 1000);
    req.log.debug(
      { verb: info.verb, resource: info.resource, name: info.name, user: req.kubeUser?.username, code: reply.statusCode, ms: Math.round(reply.elapsedTime) },
      'request',
    );
  });

  // ---- Health, version, metrics --------------------------------------------------------------
  const checks = new Map<string, () => Promise<void>>([
    ['ping', async () => {}],
    ['storage', () => store.ping()],
    ...(options.readinessChecks ?? new Map()),
  ]);
  const health = (names: string[]) => async (req: FastifyRequest, reply: FastifyReply) => {
    const lines: string[] = [];
    let ok = true;
    for (const name of names) {
      try {
        await checks.get(name)!();
        lines.push(`[+]${name} ok`);
      } catch (err) {
        ok = false;
        lines.push(`[-]${name} failed: ${(err as Error).message}`);
      }
    }
    const what = req.url.split('?')[0]!.slice(1);
    const verbose = (req.query as Query)['verbose'] !== undefined;
    const text = ok ? (verbose ? `${lines.join('\n')}\n${what} check passed\n` : 'ok') : `${lines.join('\n')}\n${what} check failed\n`;
    void reply.code(ok ? 200 : 500).type('text/plain; charset=utf-8').send(text);
  };
  app.get('/livez', health(['ping']));
  app.get('/readyz', health([...checks.keys()]));
  app.get('/healthz', health([...checks.keys()]));

  for (const route of options.admission ?? []) {
    app.post(route.path, async (req, reply) => {
      let body: unknown;
      try {
        body = JSON.parse(req.body instanceof Buffer ? req.body.toString('utf8') : '');
      } catch (err) {
        sendStatus(reply, errors.badRequest(`the body is not a JSON AdmissionReview: ${(err as Error).message}`));
        return;
      }
      const out = route.review(body);
      if (out.error !== undefined) req.log.error({ err: out.error, path: route.path }, 'admission webhook failed internally; the request was refused');
      sendText(reply, out.status, 'application/json', JSON.stringify(out.body));
    });
  }

  app.get('/version', async (_req, reply) => {
    const [major, minor] = options.version.split('.');
    void reply.type('application/json').send({
      major: major ?? '0',
      minor: minor ?? '0',
      gitVersion: `v${options.version}`,
      platform: `${process.platform}/${process.arch}`,
      goVersion: '',
      compiler: 'node',
      buildDate: '',
      gitCommit: '',
      gitTreeState: '',
    });
  });

  app.get('/metrics', async (_req, reply) => {
    void reply.type(metrics.registry.contentType).send(await metrics.registry.metrics());
  });

  // ---- Discovery and OpenAPI -----------------------------------------------------------------
  const sendDiscovery = (req: FastifyRequest, reply: FastifyReply, legacy: () => unknown, v2: (v: 'v2' | 'v2beta1') => unknown) => {
    const n = negotiate(req.headers.accept, 'discovery');
    const body = n.shape.kind === 'discovery' ? v2(n.shape.version) : legacy();
    sendText(
      reply,
      200,
      n.shape.kind === 'discovery' ? n.contentType : n.mediaType,
      n.mediaType === 'application/yaml' ? YAML.stringify(body) : JSON.stringify(body),
    );
  };
  app.get('/api', (req, reply) => sendDiscovery(req, reply, coreVersions, emptyAggregatedDiscovery));
  app.get('/apis', (req, reply) => sendDiscovery(req, reply, () => apiGroupList(resources), (v) => aggregatedDiscovery(resources, v)));
  app.get('/apis/:group', async (req, reply) => {
    const g = apiGroup(resources, (req.params as { group: string }).group);
    if (!g) throw errors.notFound({ group: '', resource: 'groups' }, (req.params as { group: string }).group);
    sendText(reply, 200, 'application/json', JSON.stringify(g));
  });
  app.get('/apis/:group/:version', async (req, reply) => {
    const { group, version } = req.params as { group: string; version: string };
    const list = apiResourceList(resources, group, version);
    if (!list) throw new ApiError('NotFound', `the server could not find the requested resource: no API ${group}/${version}`);
    sendText(reply, 200, 'application/json', JSON.stringify(list));
  });

  app.get('/openapi/v2', async (req, reply) => {
    const accept = String(req.headers.accept ?? '');
    if (!/application\/json|\*\/\*/.test(accept) && accept !== '') {
      throw errors.notAcceptable(['application/json']);
    }
    sendText(reply, 200, 'application/json', openapi.v2);
  });
  app.get('/openapi/v3', async (_req, reply) => sendText(reply, 200, 'application/json', openapi.v3Index));
  app.get('/openapi/v3/*', async (req, reply) => {
    const path = (req.params as { '*': string })['*'];
    const doc = openapi.v3.get(path);
    if (!doc) throw new ApiError('NotFound', `no OpenAPI document for ${path}`);
    const hash = one(req.query as Query, 'hash');
    reply.header('ETag', `"${doc.hash}"`);
    reply.header('Cache-Control', hash === doc.hash ? 'public, immutable' : 'no-cache, private');
    sendText(reply, 200, 'application/json', doc.body);
  });

  // ---- Resources -----------------------------------------------------------------------------
  for (const registry of registries) registerResource(app, registry, { now, metrics, logger });

  // Anything else under a served group-version: an unknown resource or an unsupported method.
  for (const base of new Set(resources.map((r) => `/apis/${r.group}/${r.version}`))) {
    const plurals = new Set(resources.map((r) => r.plural));
    app.all(`${base}/*`, async (req) => {
      const parts = (req.params as { '*': string })['*'].split('/');
      const resource = parts[0] === 'watch' ? parts[1] : parts[0];
      if (resource !== undefined && plurals.has(resource)) {
        throw errors.methodNotAllowed(req.method, req.url.split('?')[0]!);
      }
      throw new ApiError('NotFound', 'the server could not find the requested resource', {
        causes: [{ reason: 'UnexpectedServerResponse', message: '404 page not found' }],
      });
    });
  }

  return app;
}

/**
 * Watch frames of full objects, encoded once per object revision and event type and shared by
 * every watcher: a change of a megabyte-sized status then costs one encoding, not one per watcher,
 * and the socket buffers of all watchers hold the same bytes.
 */
const frames = new WeakMap<Decoded, Map<string, Buffer>>();

function sharedFrame(decoded: Decoded, type: string): Buffer {
  let byType = frames.get(decoded);
  if (!byType) frames.set(decoded, (byType = new Map()));
  let frame = byType.get(type);
  if (!frame) byType.set(type, (frame = Buffer.from(`{"type":"${type}","object":${decoded.json}}\n`, 'utf8')));
  return frame;
}

interface ResourceDeps {
  readonly now: () => number;
  readonly metrics: ApiMetrics;
  readonly logger: Logger;
}

function registerResource(app: FastifyInstance, registry: ResourceRegistry, deps: ResourceDeps): void {
  const def = registry.definition;
  const base = `/apis/${def.group}/${def.version}`;
  const collection = `${base}/${def.plural}`;
  const item = `${collection}/:name`;

  const ctxOf = (req: FastifyRequest): RequestContext => {
    const q = req.query as Query;
    const fieldManager = one(q, 'fieldManager');
    if (fieldManager !== undefined && (fieldManager.length > 128 || /[^\x20-\x7e]/.test(fieldManager))) {
      throw errors.badRequest('fieldManager must be at most 128 printable ASCII characters');
    }
    return {
      user: req.kubeUser ?? { username: 'system:anonymous', groups: ['system:unauthenticated'] },
      dryRun: dryRunOf(q),
      ...(fieldManager ? { fieldManager } : {}),
      fieldValidation: fieldValidationOf(q),
      ...(req.headers['user-agent'] ? { userAgent: req.headers['user-agent'] } : {}),
      warnings: [],
    };
  };

  const includeOf = (q: Query): IncludeObject => {
    const v = one(q, 'includeObject');
    if (v === undefined || v === '') return 'Metadata';
    if (v === 'None' || v === 'Metadata' || v === 'Object') return v;
    throw errors.badRequest(`invalid includeObject "${v}": supported values are None, Metadata and Object`);
  };

  const sendOne = (req: FastifyRequest, reply: FastifyReply, d: Decoded, code: number, ctx?: RequestContext) => {
    const n = negotiate(req.headers.accept, 'get');
    if (ctx && ctx.warnings.length > 0) reply.header('Warning', warningHeader(ctx.warnings));
    let body: string;
    switch (n.shape.kind) {
      case 'table':
        body = JSON.stringify(
          toTable(def, [d.obj], {
            version: n.shape.version,
            include: includeOf(req.query as Query),
            noHeaders: false,
            now: deps.now(),
            ...(d.obj.metadata.resourceVersion ? { resourceVersion: d.obj.metadata.resourceVersion } : {}),
          }),
        );
        break;
      case 'partial':
        body = JSON.stringify(partialObjectMetadata(d.obj, n.shape.version));
        break;
      default:
        body = n.mediaType === 'application/yaml' ? YAML.stringify(d.obj) : d.json;
    }
    sendText(reply, code, n.contentType, body);
  };

  const listBody = (n: Negotiated, list: ListResult, q: Query): string => {
    const meta = {
      resourceVersion: list.resourceVersion,
      ...(list.continue ? { continue: list.continue } : {}),
      ...(list.remainingItemCount !== undefined ? { remainingItemCount: list.remainingItemCount } : {}),
    };
    switch (n.shape.kind) {
      case 'table':
        return JSON.stringify(
          toTable(
            def,
            list.items.map((i) => i.obj),
            {
              version: n.shape.version,
              include: includeOf(q),
              noHeaders: false,
              now: deps.now(),
              resourceVersion: list.resourceVersion,
              ...(list.continue ? { continue: list.continue } : {}),
            },
          ),
        );
      case 'partialList':
        return JSON.stringify({
          kind: 'PartialObjectMetadataList',
          apiVersion: `meta.k8s.io/${n.shape.version}`,
          metadata: meta,
          items: list.items.map((i) => partialObjectMetadata(i.obj, n.shape.kind === 'partialList' ? n.shape.version : 'v1')),
        });
      default: {
        if (n.mediaType === 'application/yaml') {
          return YAML.stringify({ apiVersion: API_VERSION, kind: def.listKind, metadata: meta, items: list.items.map((i) => i.obj) });
        }
        // Items are already serialised; join them instead of stringifying megabytes again.
        return `{"apiVersion":${JSON.stringify(API_VERSION)},"kind":${JSON.stringify(def.listKind)},"metadata":${JSON.stringify(meta)},"items":[${list.items.map((i) => i.json).join(',')}]}`;
      }
    }
  };

  const listParams = (q: Query) => {
    const limit = int(q, 'limit');
    return {
      ...(one(q, 'labelSelector') !== undefined ? { labelSelector: one(q, 'labelSelector')! } : {}),
      ...(one(q, 'fieldSelector') !== undefined ? { fieldSelector: one(q, 'fieldSelector')! } : {}),
      ...(limit !== undefined ? { limit } : {}),
      ...(one(q, 'continue') ? { continue: one(q, 'continue')! } : {}),
      ...(one(q, 'resourceVersion') !== undefined ? { resourceVersion: one(q, 'resourceVersion')! } : {}),
      ...(one(q, 'resourceVersionMatch') ? { resourceVersionMatch: one(q, 'resourceVersionMatch')! } : {}),
    };
  };

  const deleteParams = (req: FastifyRequest) => {
    const q = req.query as Query;
    let body: Record<string, unknown> = {};
    if (req.body instanceof Buffer && req.body.length > 0) {
      const parsed = contentTypeOf(req) === 'application/yaml' ? parseYaml(req.body.toString('utf8')) : parseJson(req.body.toString('utf8'));
      if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
        throw errors.badRequest('the DeleteOptions body must be an object');
      }
      body = parsed as Record<string, unknown>;
    }
    const pre = body['preconditions'] as { uid?: string; resourceVersion?: string } | undefined;
    const policy = (body['propagationPolicy'] as string | undefined) ?? one(q, 'propagationPolicy');
    const orphan = body['orphanDependents'] ?? bool(q, 'orphanDependents');
    const dry = body['dryRun'];
    return {
      params: {
        ...(policy !== undefined ? { propagationPolicy: policy } : orphan === true ? { propagationPolicy: 'Orphan' } : {}),
        ...(pre ? { preconditions: pre } : {}),
      },
      dryRun: Array.isArray(dry) && dry.length > 0,
      dryValues: Array.isArray(dry) ? dry : [],
    };
  };

  // Watch: a chunked stream of JSON lines, one event per line.
  const serveWatch = async (req: FastifyRequest, reply: FastifyReply, fixedName?: string) => {
    const q = req.query as Query;
    const n = negotiate(req.headers.accept, 'list');
    const include = includeOf(q);
    let fieldSelector = one(q, 'fieldSelector');
    if (fixedName !== undefined) fieldSelector = [fieldSelector, `metadata.name=${fixedName}`].filter(Boolean).join(',');
    const sendInitialEvents = bool(q, 'sendInitialEvents');
    const allowBookmarks = bool(q, 'allowWatchBookmarks') ?? false;
    const timeoutSeconds = int(q, 'timeoutSeconds') ?? MIN_REQUEST_TIMEOUT_SECONDS * (1 + Math.random());
    const abort = new AbortController();
    const iterator = await registry.watch(
      {
        ...(one(q, 'labelSelector') ? { labelSelector: one(q, 'labelSelector')! } : {}),
        ...(fieldSelector ? { fieldSelector } : {}),
        ...(one(q, 'resourceVersion') !== undefined ? { resourceVersion: one(q, 'resourceVersion')! } : {}),
        ...(one(q, 'resourceVersionMatch') ? { resourceVersionMatch: one(q, 'resourceVersionMatch')! } : {}),
        ...(sendInitialEvents !== undefined ? { sendInitialEvents } : {}),
        allowWatchBookmarks: allowBookmarks,
      },
      abort.signal,
    );
    const res = reply.raw;
    reply.hijack();
    res.writeHead(200, {
      'Content-Type': n.shape.kind === 'table' ? n.contentType : n.mediaType === 'application/yaml' ? 'application/json' : 'application/json',
      'Cache-Control': 'no-cache, private',
      'Transfer-Encoding': 'chunked',
    });
    res.flushHeaders();
    deps.metrics.watchers.inc({ resource: def.plural });
    let headersSent = false;
    let lastRv = '';
    const encode = (ev: WatchItem): string | Buffer => {
      deps.metrics.watchEvents.inc({ resource: def.plural, type: ev.type });
      if (ev.type === 'ERROR') return `{"type":"ERROR","object":${JSON.stringify(ev.error.toStatus())}}\n`;
      if (ev.type === 'BOOKMARK') {
        const meta = {
          resourceVersion: ev.resourceVersion,
          creationTimestamp: null,
          ...(ev.initialEventsEnd ? { annotations: { 'k8s.io/initial-events-end': 'true' } } : {}),
        };
        const obj =
          n.shape.kind === 'table'
            ? { kind: 'Table', apiVersion: `meta.k8s.io/${n.shape.version}`, metadata: { resourceVersion: ev.resourceVersion }, columnDefinitions: null, rows: [] }
            : n.shape.kind === 'partialList'
              ? { kind: 'PartialObjectMetadata', apiVersion: `meta.k8s.io/${n.shape.version}`, metadata: meta }
              : { kind: def.kind, apiVersion: API_VERSION, metadata: meta };
        return `{"type":"BOOKMARK","object":${JSON.stringify(obj)}}\n`;
      }
      lastRv = ev.decoded.obj.metadata.resourceVersion ?? lastRv;
      let obj: string;
      if (n.shape.kind === 'table') {
        obj = JSON.stringify(
          toTable(def, [ev.decoded.obj], { version: n.shape.version, include, noHeaders: headersSent, now: deps.now() }),
        );
        headersSent = true;
      } else if (n.shape.kind === 'partialList') {
        obj = JSON.stringify(partialObjectMetadata(ev.decoded.obj, n.shape.version));
      } else {
        return sharedFrame(ev.decoded, ev.type);
      }
      return `{"type":"${ev.type}","object":${obj}}\n`;
    };
    const write = async (text: string | Buffer) => {
      if (!res.write(text)) await new Promise<void>((resolve) => {
        const done = () => { res.off('drain', done); res.off('close', done); resolve(); };
        res.once('drain', done);
        res.once('close', done);
      });
    };
    const stop = () => abort.abort();
    res.once('close', stop);
    const timeout = setTimeout(stop, timeoutSeconds * 1000);
    const bookmarks = allowBookmarks
      ? setInterval(() => {
          if (lastRv) res.write(encode({ type: 'BOOKMARK', resourceVersion: lastRv, initialEventsEnd: false }));
        }, registry.bookmarkIntervalMs)
      : undefined;
    try {
      const aborted = new Promise<IteratorResult<WatchItem>>((resolve) =>
        abort.signal.addEventListener('abort', () => resolve({ done: true, value: undefined }), { once: true }),
      );
      while (!abort.signal.aborted) {
        const next = await Promise.race([iterator.next(), aborted]);
        if (next.done) break;
        await write(encode(next.value));
        if (next.value.type === 'ERROR') break;
      }
      // Leaves the bookmark RV at the last revision sent when the stream started empty.
      if (!lastRv) lastRv = String(await registry.currentRevision().catch(() => 0));
    } catch (err) {
      const e = toApiError(err);
      if (!res.destroyed) res.write(`{"type":"ERROR","object":${JSON.stringify(e.toStatus())}}\n`);
    } finally {
      clearTimeout(timeout);
      if (bookmarks) clearInterval(bookmarks);
      res.off('close', stop);
      abort.abort();
      void iterator.return(undefined);
      deps.metrics.watchers.dec({ resource: def.plural });
      if (!res.destroyed) res.end();
    }
  };

  app.get(collection, async (req, reply) => {
    const q = req.query as Query;
    if (bool(q, 'watch')) return serveWatch(req, reply);
    const n = negotiate(req.headers.accept, 'list');
    const list = await registry.list(listParams(q));
    sendText(reply, 200, n.contentType, listBody(n, list, q));
  });
  app.get(`${base}/watch/${def.plural}`, (req, reply) => serveWatch(req, reply));
  app.get(`${base}/watch/${def.plural}/:name`, (req, reply) => serveWatch(req, reply, (req.params as { name: string }).name));

  app.post(collection, async (req, reply) => {
    const ctx = ctxOf(req);
    const created = await registry.create(parseObjectBody(req), ctx);
    sendOne(req, reply, created, 201, ctx);
  });

  app.delete(collection, async (req, reply) => {
    const ctx = ctxOf(req);
    const { params, dryRun } = deleteParams(req);
    const list = await registry.deleteCollection(listParams(req.query as Query), params, { ...ctx, dryRun: ctx.dryRun || dryRun });
    const n = negotiate(req.headers.accept, 'list');
    sendText(reply, 200, n.contentType, listBody(n, list, req.query as Query));
  });

  for (const sub of ['', 'status'] as const) {
    const path = sub ? `${item}/${sub}` : item;
    app.get(path, async (req, reply) => {
      const d = await registry.get((req.params as { name: string }).name);
      sendOne(req, reply, d, 200);
    });
    app.put(path, async (req, reply) => {
      const ctx = ctxOf(req);
      const d = await registry.update((req.params as { name: string }).name, parseObjectBody(req), ctx, sub as Subresource);
      sendOne(req, reply, d, 200, ctx);
    });
    app.patch(path, async (req, reply) => {
      const ctx = ctxOf(req);
      const ct = contentTypeOf(req);
      const type = patchTypeOf(ct);
      if (!type) {
        throw errors.unsupportedMediaType(ct, [
          'application/json-patch+json',
          'application/merge-patch+json',
          'application/apply-patch+yaml',
          'application/strategic-merge-patch+json',
        ]);
      }
      const raw = req.body instanceof Buffer ? req.body.toString('utf8') : '';
      if (raw.trim() === '') throw errors.badRequest('the patch body is empty');
      const body = type === 'apply' ? parseYaml(raw) : parseJson(raw);
      const force = bool(req.query as Query, 'force') ?? false;
      if (force && type !== 'apply') throw errors.badRequest('force is only allowed for apply patches');
      const { decoded, created } = await registry.patch((req.params as { name: string }).name, type, body, ctx, sub as Subresource, force);
      sendOne(req, reply, decoded, created ? 201 : 200, ctx);
    });
  }

  app.delete(item, async (req, reply) => {
    const ctx = ctxOf(req);
    const { params, dryRun } = deleteParams(req);
    const name = (req.params as { name: string }).name;
    const { decoded, deleted } = await registry.delete(name, params, { ...ctx, dryRun: ctx.dryRun || dryRun });
    if (deleted && negotiate(req.headers.accept, 'get').shape.kind !== 'object') {
      sendText(reply, 200, 'application/json', JSON.stringify(successStatus({ name, group: def.group, kind: def.plural, uid: String(decoded.obj.metadata.uid) })));
      return;
    }
    sendOne(req, reply, decoded, 200, ctx);
  });

}

export type { KubeObject };
