/**
 * The generic registry of one resource: kube-apiserver's `genericregistry.Store` for these kinds.
 * It owns the API semantics between HTTP and storage: strategies for create/update/status,
 * optimistic concurrency, generation, finalizers and deletion, patches and server-side apply,
 * managedFields, dry run, list snapshots with continue tokens, and filtered watches.
 */
import { randomUUID, randomInt } from 'node:crypto';
import type { Ajv } from 'ajv';
import type { Logger } from 'pino';
import type { KubeObject, ResourceDefinition } from '../api/resources.ts';
import { API_VERSION } from '../api/schema.ts';
import { fieldError, toCause, type FieldError } from '../api/field-errors.ts';
import { compileObjectValidator, pruneUnknownFields, validateObjectMeta } from '../api/validation.ts';
import {
  ApplyBadRequestError,
  ApplyConflictError,
  FieldManagerError,
  conflictCauses,
  formatConflictMessage,
  type FieldManager,
} from '../apply/field-manager.ts';
import type { UserInfo } from '../auth/types.ts';
import { StoreError, type Store, type StoredValue, type StoreEvent } from '../storage/store.ts';
import { ApiError, errors, toApiError as toApiErrorLike, type GroupResource } from './errors.ts';
import { jsonPatch, mergePatch, strategicMergePatch, type PatchType } from './patch.ts';
import { parseFieldSelector, parseLabelSelector, type FieldSelector, type LabelSelector } from './selectors.ts';

export type FieldValidation = 'Strict' | 'Warn' | 'Ignore';
export type Subresource = '' | 'status';

export interface RequestContext {
  readonly user: UserInfo;
  readonly dryRun: boolean;
  readonly fieldManager?: string;
  readonly fieldValidation: FieldValidation;
  readonly userAgent?: string;
  /** Warnings for the client, sent as `Warning: 299` headers. */
  readonly warnings: string[];
}

/** One decoded object, shared read-only between requests; `json` is its wire form. */
export interface Decoded {
  readonly obj: KubeObject;
  readonly json: string;
  readonly revision: number;
}

export type AdmissionOperation = 'CREATE' | 'UPDATE' | 'DELETE';

export interface AdmissionAttributes {
  readonly operation: AdmissionOperation;
  readonly resource: ResourceDefinition;
  readonly subresource: Subresource;
  readonly name: string;
  readonly object?: KubeObject;
  readonly oldObject?: KubeObject;
  readonly user: UserInfo;
  readonly dryRun: boolean;
}

export type AdmissionResult =
  | { readonly allowed: true; readonly warnings?: readonly string[] }
  | { readonly allowed: false; readonly message: string; readonly code?: number; readonly warnings?: readonly string[] };

/** In-process validating admission for this server's own kinds (kube-apiserver calls no webhooks for them). */
export interface ValidatingAdmission {
  readonly name: string;
  validate(attrs: AdmissionAttributes): Promise<AdmissionResult>;
}

export interface ListParams {
  readonly labelSelector?: string;
  readonly fieldSelector?: string;
  readonly limit?: number;
  readonly continue?: string;
  readonly resourceVersion?: string;
  readonly resourceVersionMatch?: string;
}

export interface ListResult {
  readonly items: readonly Decoded[];
  readonly resourceVersion: string;
  readonly continue?: string;
  readonly remainingItemCount?: number;
}

export interface DeleteParams {
  readonly propagationPolicy?: string;
  readonly preconditions?: { readonly uid?: string; readonly resourceVersion?: string };
}

export interface WatchParams {
  readonly labelSelector?: string;
  readonly fieldSelector?: string;
  readonly resourceVersion?: string;
  readonly resourceVersionMatch?: string;
  readonly sendInitialEvents?: boolean;
  readonly allowWatchBookmarks?: boolean;
}

export type WatchItem =
  | { readonly type: 'ADDED' | 'MODIFIED' | 'DELETED'; readonly decoded: Decoded }
  | { readonly type: 'BOOKMARK'; readonly resourceVersion: string; readonly initialEventsEnd: boolean }
  | { readonly type: 'ERROR'; readonly error: ApiError };

export interface RegistryOptions {
  readonly store: Store;
  readonly definition: ResourceDefinition;
  readonly ajv: Ajv;
  readonly fieldManager: FieldManager;
  readonly logger: Logger;
  readonly now?: () => Date;
  readonly admission?: readonly ValidatingAdmission[];
  readonly bookmarkIntervalMs?: number;
}

const MAX_CONFLICT_RETRIES = 5;
const DELETED_CACHE_SIZE = 256;
const GENERATE_NAME_SUFFIX_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789';
const SUPPORTED_FIELDS = ['metadata.name', 'metadata.namespace'];

/** Metadata only the server sets. */
const SERVER_OWNED_META = ['uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'generation', 'selfLink'];

const rfc3339 = (d: Date) => d.toISOString().replace(/\.\d{3}Z$/, 'Z');
const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
const sameJson = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);

interface ContinueToken {
  readonly rv: number;
  readonly start: string;
}

function encodeContinue(t: ContinueToken): string {
  return Buffer.from(JSON.stringify({ v: 'meta.k8s.io/v1', rv: t.rv, start: t.start })).toString('base64url');
}

function decodeContinue(token: string): ContinueToken {
  try {
    const raw = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as { v?: string; rv?: number; start?: string };
    if (raw.v !== 'meta.k8s.io/v1' || typeof raw.rv !== 'number' || typeof raw.start !== 'string') throw new Error('shape');
    return { rv: raw.rv, start: raw.start };
  } catch {
    throw errors.badRequest(`invalid continue token "${token}": it was not issued by this server`);
  }
}

function parseRevision(rv: string, what: string): number {
  if (!/^\d+$/.test(rv)) throw errors.badRequest(`invalid ${what} "${rv}": a resourceVersion is a decimal integer`);
  return Number(rv);
}

export class ResourceRegistry {
  readonly definition: ResourceDefinition;
  readonly groupResource: GroupResource;
  private readonly store: Store;
  private readonly validate: (obj: unknown) => FieldError[];
  private readonly fm: FieldManager;
  private readonly log: Logger;
  private readonly now: () => Date;
  private readonly admission: readonly ValidatingAdmission[];
  private readonly prefix: string;
  private readonly cache = new Map<string, Decoded>();
  private readonly deletedCache = new Map<string, Decoded>();
  readonly bookmarkIntervalMs: number;

  constructor(o: RegistryOptions) {
    this.definition = o.definition;
    this.groupResource = { group: o.definition.group, resource: o.definition.plural };
    this.store = o.store;
    this.validate = compileObjectValidator(o.ajv, o.definition.schema as Record<string, unknown>);
    this.fm = o.fieldManager;
    this.log = o.logger.child({ resource: o.definition.plural });
    this.now = o.now ?? (() => new Date());
    this.admission = o.admission ?? [];
    this.prefix = `/${o.definition.group}/${o.definition.plural}/`;
    this.bookmarkIntervalMs = o.bookmarkIntervalMs ?? 60_000;
  }

  private key(name: string): string {
    return this.prefix + name;
  }

  private nameOf(key: string): string {
    return key.slice(this.prefix.length);
  }

  /** Decodes a stored value, sharing the result for the current revision of each key. */
  decode(sv: StoredValue): Decoded {
    const hit = this.cache.get(sv.key);
    if (hit && hit.revision === sv.modRevision) return hit;
    const obj = JSON.parse(sv.value) as KubeObject;
    obj.metadata.resourceVersion = String(sv.modRevision);
    const decoded: Decoded = { obj, json: JSON.stringify(obj), revision: sv.modRevision };
    if (!hit || hit.revision < sv.modRevision) this.cache.set(sv.key, decoded);
    return decoded;
  }

  private encode(obj: KubeObject): string {
    const { resourceVersion: _rv, ...meta } = obj.metadata;
    return JSON.stringify({ ...obj, metadata: meta });
  }

  private storeError(err: unknown, name: string): never {
    if (err instanceof StoreError) {
      switch (err.code) {
        case 'NotFound':
          throw errors.notFound(this.groupResource, name);
        case 'AlreadyExists':
          throw errors.alreadyExists(this.groupResource, name);
        case 'Conflict':
          throw errors.conflict(
            this.groupResource,
            name,
            'the object has been modified; please apply your changes to the latest version and try again',
          );
        case 'Expired':
          throw errors.expired(err.message);
        case 'TooLarge':
          throw new ApiError('RequestEntityTooLarge', `the object is too large to store: ${err.message}`);
        case 'Unavailable':
          throw errors.unavailable(`storage is unavailable: ${err.message}`);
      }
    }
    throw errors.internal(err instanceof Error ? err.message : String(err), err);
  }

  /** Field-manager failures as kube-apiserver answers them. */
  private fieldManagerError(err: unknown, name: string): ApiError {
    if (err instanceof ApiError) return err;
    if (err instanceof ApplyBadRequestError) return errors.badRequest(err.message);
    if (err instanceof FieldManagerError) {
      return errors.internal(`failed to create typed patch object (${this.definition.kind} ${name}): ${err.message}`, err);
    }
    return toApiErrorLike(err);
  }

  async get(name: string): Promise<Decoded> {
    let sv: StoredValue | undefined;
    try {
      sv = await this.store.get(this.key(name));
    } catch (err) {
      this.storeError(err, name);
    }
    if (!sv) throw errors.notFound(this.groupResource, name);
    return this.decode(sv);
  }

  private selectors(p: { labelSelector?: string; fieldSelector?: string }) {
    const labels = parseLabelSelector(p.labelSelector);
    const fields = parseFieldSelector(p.fieldSelector, SUPPORTED_FIELDS);
    return { labels, fields };
  }

  private matches(obj: KubeObject, labels: LabelSelector, fields: FieldSelector): boolean {
    return (
      labels.matches(obj.metadata.labels) &&
      fields.matches({ 'metadata.name': obj.metadata.name ?? '', 'metadata.namespace': '' })
    );
  }

  async list(p: ListParams): Promise<ListResult> {
    const { labels, fields } = this.selectors(p);
    let atRevision: number | undefined;
    let startAfter: string | undefined;
    if (p.continue) {
      const token = decodeContinue(p.continue);
      atRevision = token.rv;
      startAfter = this.key(token.start);
      if (p.resourceVersion !== undefined && p.resourceVersion !== '') {
        throw errors.badRequest('specifying resource version is not allowed when using continue');
      }
    } else if (p.resourceVersion && p.resourceVersion !== '0') {
      const rv = parseRevision(p.resourceVersion, 'resourceVersion');
      const match = p.resourceVersionMatch ?? '';
      if (match === 'Exact') atRevision = rv;
      else if (match === 'NotOlderThan' || match === '') {
        const current = await this.currentRevision();
        if (rv > current) {
          throw new ApiError('Timeout', `Too large resource version: ${rv}, current: ${current}`, {
            causes: [{ reason: 'ResourceVersionTooLarge', message: 'Too large resource version' }],
            retryAfterSeconds: 1,
          });
        }
      } else {
        throw errors.badRequest(`invalid resourceVersionMatch "${match}": supported values are Exact and NotOlderThan`);
      }
    } else if (p.resourceVersionMatch && p.resourceVersionMatch !== 'NotOlderThan') {
      throw errors.badRequest(`resourceVersionMatch "${p.resourceVersionMatch}" requires a resourceVersion`);
    }
    const limit = p.limit && p.limit > 0 ? p.limit : 0;
    const filter = (sv: StoredValue) => this.matches(this.decode(sv).obj, labels, fields);
    let result;
    try {
      result = await this.store.list(this.prefix, {
        ...(startAfter !== undefined ? { startAfter } : {}),
        ...(limit ? { limit } : {}),
        ...(atRevision !== undefined ? { atRevision } : {}),
        ...(labels.empty && fields.empty ? {} : { filter }),
      });
    } catch (err) {
      if (err instanceof StoreError && err.code === 'Expired' && p.continue) {
        throw errors.expired(
          'The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results.',
        );
      }
      if (err instanceof StoreError && err.code === 'Expired') {
        throw errors.expired(`too old resource version: ${p.resourceVersion} (${await this.compactedRevision()})`);
      }
      this.storeError(err, '');
    }
    const items = result.items.map((sv) => this.decode(sv));
    const last = items.at(-1);
    return {
      items,
      resourceVersion: String(result.revision),
      ...(result.more && last ? { continue: encodeContinue({ rv: result.revision, start: last.obj.metadata.name! }) } : {}),
    };
  }

  async currentRevision(): Promise<number> {
    try {
      return await this.store.currentRevision();
    } catch (err) {
      this.storeError(err, '');
    }
  }

  private async compactedRevision(): Promise<number> {
    try {
      return await this.store.compactedRevision();
    } catch {
      return 0;
    }
  }

  /** Checks apiVersion/kind of a request body and prunes unknown fields per `fieldValidation`. */
  private decodeBody(body: unknown, ctx: RequestContext, requireTypeMeta: boolean): KubeObject {
    if (!isObject(body)) throw errors.badRequest('the request body must be a JSON or YAML object');
    const def = this.definition;
    const apiVersion = body['apiVersion'];
    const kind = body['kind'];
    if (requireTypeMeta && (apiVersion === undefined || kind === undefined)) {
      throw errors.badRequest(
        `${apiVersion === undefined ? 'apiVersion' : 'kind'} must be set: expected apiVersion ${API_VERSION} and kind ${def.kind}`,
      );
    }
    if (apiVersion !== undefined && apiVersion !== API_VERSION) {
      throw errors.badRequest(`the API version in the data (${String(apiVersion)}) does not match the expected API version (${API_VERSION})`);
    }
    if (kind !== undefined && kind !== def.kind) {
      throw errors.badRequest(`the kind in the data (${String(kind)}) does not match the expected kind (${def.kind})`);
    }
    const obj = structuredClone(body) as KubeObject;
    obj.apiVersion = API_VERSION;
    obj.kind = def.kind;
    if (!isObject(obj.metadata)) obj.metadata = {};
    const unknown = pruneUnknownFields(def.schema as Record<string, unknown>, obj).map((p) => p.slice(1));
    if (unknown.length > 0) {
      if (ctx.fieldValidation === 'Strict') {
        const msgs = unknown.map((f) => `unknown field "${f}"`);
        throw errors.badRequest(`strict decoding error: ${msgs.join(', ')}`, msgs.map((m, i) => ({ reason: 'FieldValueInvalid', message: m, field: unknown[i]! })));
      }
      if (ctx.fieldValidation === 'Warn') for (const f of unknown) ctx.warnings.push(`unknown field "${f}"`);
    }
    return obj;
  }

  private invalid(name: string, errs: readonly FieldError[]): ApiError {
    return errors.invalid(this.groupResource, this.definition.kind, name, errs.map(toCause));
  }

  private check(obj: KubeObject, requireName: boolean): void {
    const errs = [...validateObjectMeta(obj.metadata, requireName), ...this.validate(obj)];
    if (errs.length > 0) throw this.invalid(obj.metadata.name ?? obj.metadata['generateName'] as string ?? '', errs);
  }

  private managerOf(ctx: RequestContext, apply: boolean): string {
    if (ctx.fieldManager) return ctx.fieldManager;
    if (apply) {
      throw errors.invalid(this.groupResource, this.definition.kind, '', [
        toCause(fieldError.required('fieldManager', 'is required for apply patch')),
      ]);
    }
    return (ctx.userAgent ?? 'unknown').split('/')[0]!.slice(0, 128) || 'unknown';
  }

  private async admit(attrs: Omit<AdmissionAttributes, 'resource'>, ctx: RequestContext): Promise<void> {
    for (const hook of this.admission) {
      const r = await hook.validate({ ...attrs, resource: this.definition });
      if (r.warnings) ctx.warnings.push(...r.warnings);
      if (!r.allowed) {
        throw new ApiError('Forbidden', `admission webhook "${hook.name}" denied the request: ${r.message}`, {
          name: attrs.name,
          group: this.definition.group,
          kind: this.definition.plural,
        });
      }
    }
  }

  /** Create strategy: server-owned metadata, status reset, defaults, validation, managedFields. */
  private prepareForCreate(obj: KubeObject, ctx: RequestContext, manager: string, applied?: KubeObject): KubeObject {
    const m = obj.metadata;
    for (const f of [...SERVER_OWNED_META, 'resourceVersion', 'namespace']) delete m[f];
    if (!m.name) {
      const gen = m['generateName'];
      if (typeof gen === 'string' && gen !== '') {
        let suffix = '';
        for (let i = 0; i < 5; i++) suffix += GENERATE_NAME_SUFFIX_ALPHABET[randomInt(GENERATE_NAME_SUFFIX_ALPHABET.length)];
        m.name = gen.slice(0, 253 - 5) + suffix;
      }
    }
    delete obj.status;
    this.definition.applyDefaults(obj);
    this.check(obj, true);
    m.uid = randomUUID();
    m.creationTimestamp = rfc3339(this.now());
    m.generation = 1;
    let withFields: KubeObject;
    try {
      withFields = applied
        ? ({ ...(this.fm.apply({ current: undefined, applied, manager, force: true, subresource: '' }) as KubeObject) })
        : (this.fm.update({ previous: undefined, next: obj, manager, subresource: '' }) as KubeObject);
    } catch (err) {
      throw this.fieldManagerError(err, m.name ?? '');
    }
    if (applied) {
      // Apply computed the object from the applied configuration; keep the server-set metadata.
      withFields.metadata = { ...withFields.metadata, uid: m.uid, creationTimestamp: m.creationTimestamp, generation: 1 };
      delete withFields.status;
      this.definition.applyDefaults(withFields);
      this.check(withFields, true);
    }
    void ctx;
    return withFields;
  }

  async create(body: unknown, ctx: RequestContext): Promise<Decoded> {
    const obj = this.decodeBody(body, ctx, false);
    const manager = this.managerOf(ctx, false);
    const prepared = this.prepareForCreate(obj, ctx, manager);
    return this.persistCreate(prepared, ctx);
  }

  private async persistCreate(obj: KubeObject, ctx: RequestContext): Promise<Decoded> {
    const name = obj.metadata.name!;
    await this.admit({ operation: 'CREATE', subresource: '', name, object: obj, user: ctx.user, dryRun: ctx.dryRun }, ctx);
    if (ctx.dryRun) return { obj, json: JSON.stringify(obj), revision: 0 };
    try {
      return this.decode(await this.store.create(this.key(name), this.encode(obj)));
    } catch (err) {
      this.storeError(err, name);
    }
  }

  /**
   * Update strategy for the main resource or the status subresource, applied to `next` derived
   * from `current`. Returns the object to write.
   */
  private prepareForUpdate(current: KubeObject, next: KubeObject, subresource: Subresource): KubeObject {
    let out: KubeObject;
    if (subresource === 'status') {
      // Only status changes through /status; managedFields are recomputed by the caller.
      out = structuredClone(current);
      if (next.status === undefined) delete out.status;
      else out.status = next.status;
      // Server-side apply computed ownership on `next`; an update recomputes it from `current`.
      if (next.metadata.managedFields !== undefined) out.metadata.managedFields = next.metadata.managedFields;
    } else {
      // `next` may share unchanged parts with `current` (server-side apply returns them as they
      // are), and `current` is shared with other requests: copy what is changed below.
      out = { ...next, metadata: { ...next.metadata } };
      if (out.spec) out.spec = { ...out.spec };
      if (current.status === undefined) delete out.status;
      else out.status = structuredClone(current.status);
      const cm = current.metadata;
      const m = out.metadata;
      for (const f of SERVER_OWNED_META) {
        if (cm[f] === undefined) delete m[f];
        else m[f] = cm[f];
      }
      m.name = cm.name!;
      delete m.namespace;
      if (cm.deletionTimestamp) {
        const added = (m.finalizers ?? []).filter((f) => !(cm.finalizers ?? []).includes(f));
        if (added.length > 0) {
          throw this.invalid(cm.name!, [
            fieldError.forbidden('metadata.finalizers', `no new finalizers can be added if the object is being deleted, found new finalizers ${JSON.stringify(added)}`),
          ]);
        }
      }
      this.definition.applyDefaults(out);
      const specChanged = !sameJson(
        Object.entries(current).filter(([k]) => !['metadata', 'status', 'apiVersion', 'kind'].includes(k)),
        Object.entries(out).filter(([k]) => !['metadata', 'status', 'apiVersion', 'kind'].includes(k)),
      );
      if (specChanged) m.generation = (cm.generation ?? 0) + 1;
    }
    out.metadata.resourceVersion = current.metadata.resourceVersion!;
    return out;
  }

  /**
   * Read-modify-write with optimistic concurrency. `mutate` gets the current object and returns
   * the next one; it is called again when the store reports a concurrent write, unless the
   * client pinned a resourceVersion (then the 409 goes back to the client).
   */
  private async guaranteedUpdate(
    name: string,
    ctx: RequestContext,
    mutate: (current: Decoded | undefined) => Promise<{ next: KubeObject; pinned: boolean; create?: boolean }>,
  ): Promise<{ decoded: Decoded; created: boolean }> {
    for (let attempt = 0; ; attempt++) {
      let current: Decoded | undefined;
      try {
        current = await this.get(name);
      } catch (err) {
        if (!(err instanceof ApiError && err.reason === 'NotFound')) throw err;
      }
      const { next, pinned, create } = await mutate(current);
      if (create || !current) {
        return { decoded: await this.persistCreate(next, ctx), created: true };
      }
      if (pinned && next.metadata.resourceVersion !== current.obj.metadata.resourceVersion) {
        throw errors.conflict(
          this.groupResource,
          name,
          'the object has been modified; please apply your changes to the latest version and try again',
        );
      }
      const nextEncoded = this.encode(next);
      if (nextEncoded === this.encode(current.obj)) return { decoded: current, created: false };
      await this.admit(
        { operation: 'UPDATE', subresource: '', name, object: next, oldObject: current.obj, user: ctx.user, dryRun: ctx.dryRun },
        ctx,
      );
      if (ctx.dryRun) {
        return { decoded: { obj: next, json: JSON.stringify(next), revision: current.revision }, created: false };
      }
      try {
        if (next.metadata.deletionTimestamp && (next.metadata.finalizers ?? []).length === 0) {
          const deleted = await this.store.delete(this.key(name), current.revision);
          this.log.info({ name }, 'object deleted after its last finalizer was removed');
          const obj = JSON.parse(nextEncoded) as KubeObject;
          obj.metadata.resourceVersion = String(deleted.modRevision);
          return { decoded: { obj, json: JSON.stringify(obj), revision: deleted.modRevision }, created: false };
        }
        return { decoded: this.decode(await this.store.update(this.key(name), nextEncoded, current.revision)), created: false };
      } catch (err) {
        if (err instanceof StoreError && err.code === 'Conflict' && !pinned && attempt < MAX_CONFLICT_RETRIES) continue;
        this.storeError(err, name);
      }
    }
  }

  async update(name: string, body: unknown, ctx: RequestContext, subresource: Subresource): Promise<Decoded> {
    const obj = this.decodeBody(body, ctx, false);
    if (obj.metadata.name !== undefined && obj.metadata.name !== name) {
      throw errors.badRequest(`the name of the object (${obj.metadata.name}) does not match the name on the URL (${name})`);
    }
    const rv = obj.metadata.resourceVersion;
    if (!rv) {
      throw this.invalid(name, [fieldError.invalid('metadata.resourceVersion', 0, 'must be specified for an update')]);
    }
    const manager = this.managerOf(ctx, false);
    const r = await this.guaranteedUpdate(name, ctx, async (current) => {
      if (!current) throw errors.notFound(this.groupResource, name);
      const next = this.prepareForUpdate(current.obj, structuredClone(obj), subresource);
      next.metadata.resourceVersion = rv;
      this.check(next, true);
      try {
        return { next: this.fm.update({ previous: current.obj, next, manager, subresource }) as KubeObject, pinned: true };
      } catch (err) {
        throw this.fieldManagerError(err, name);
      }
    });
    return r.decoded;
  }

  async patch(
    name: string,
    type: PatchType,
    patch: unknown,
    ctx: RequestContext,
    subresource: Subresource,
    force: boolean,
  ): Promise<{ decoded: Decoded; created: boolean }> {
    const manager = this.managerOf(ctx, type === 'apply');
    let applied: KubeObject | undefined;
    if (type === 'apply') {
      applied = this.decodeBody(patch, ctx, true);
      if (applied.metadata.name !== undefined && applied.metadata.name !== name) {
        throw errors.badRequest(`the name of the object (${String(applied.metadata.name)}) does not match the name on the URL (${name})`);
      }
      applied.metadata.name = name;
    } else if (!(type === 'json' ? Array.isArray(patch) : isObject(patch))) {
      throw errors.badRequest(`the ${type} patch must be a JSON ${type === 'json' ? 'array' : 'object'}`);
    }
    return this.guaranteedUpdate(name, ctx, async (current) => {
      if (!current) {
        if (!applied || subresource !== '') throw errors.notFound(this.groupResource, name);
        const obj = structuredClone(applied);
        return { next: this.prepareForCreate(obj, ctx, manager, applied), pinned: false, create: true };
      }
      const cur = current.obj;
      let patched: KubeObject;
      if (applied) {
        try {
          patched = this.fm.apply({ current: cur, applied, manager, force, subresource }) as KubeObject;
          // The same object back means the apply changes nothing: no write.
          if (patched === cur) return { next: cur, pinned: false };
        } catch (err) {
          if (err instanceof ApplyConflictError) {
            throw new ApiError('Conflict', formatConflictMessage(err.conflicts), {
              name,
              group: this.definition.group,
              kind: this.definition.plural,
              causes: conflictCauses(err.conflicts),
            });
          }
          throw this.fieldManagerError(err, name);
        }
      } else {
        const base = structuredClone(cur);
        const result =
          type === 'merge' ? mergePatch(base, patch) : type === 'strategic' ? strategicMergePatch(base, patch) : jsonPatch(base, patch);
        if (!isObject(result)) throw errors.badRequest('the patch did not produce an object');
        patched = this.decodeBody(result, ctx, false);
      }
      const pinnedRv = patched.metadata.resourceVersion;
      const pinned = pinnedRv !== undefined && pinnedRv !== cur.metadata.resourceVersion;
      if (patched.metadata.name !== undefined && patched.metadata.name !== name) {
        throw this.invalid(name, [fieldError.invalid('metadata.name', patched.metadata.name, 'field is immutable')]);
      }
      if (patched.metadata.uid !== undefined && patched.metadata.uid !== cur.metadata.uid) {
        throw errors.conflict(this.groupResource, name, `Precondition failed: UID in precondition: ${String(patched.metadata.uid)}, UID in object meta: ${String(cur.metadata.uid)}`);
      }
      const next = this.prepareForUpdate(cur, patched, subresource);
      if (pinned) next.metadata.resourceVersion = pinnedRv;
      this.check(next, true);
      let tracked = next;
      if (!applied) {
        try {
          tracked = this.fm.update({ previous: cur, next, manager, subresource }) as KubeObject;
        } catch (err) {
          throw this.fieldManagerError(err, name);
        }
      }
      return { next: tracked, pinned };
    });
  }

  async delete(name: string, params: DeleteParams, ctx: RequestContext): Promise<{ decoded: Decoded; deleted: boolean }> {
    for (let attempt = 0; ; attempt++) {
      const current = await this.get(name);
      const cur = current.obj;
      const pre = params.preconditions;
      if (pre?.uid && pre.uid !== cur.metadata.uid) {
        throw errors.conflict(this.groupResource, name, `Precondition failed: UID in precondition: ${pre.uid}, UID in object meta: ${String(cur.metadata.uid)}`);
      }
      if (pre?.resourceVersion && pre.resourceVersion !== cur.metadata.resourceVersion) {
        throw errors.conflict(
          this.groupResource,
          name,
          `Precondition failed: ResourceVersion in precondition: ${pre.resourceVersion}, ResourceVersion in object meta: ${String(cur.metadata.resourceVersion)}`,
        );
      }
      await this.admit({ operation: 'DELETE', subresource: '', name, oldObject: cur, user: ctx.user, dryRun: ctx.dryRun }, ctx);
      const finalizers = [...(cur.metadata.finalizers ?? [])];
      const policy = params.propagationPolicy;
      if (policy !== undefined && !['Orphan', 'Background', 'Foreground'].includes(policy)) {
        throw errors.badRequest(`invalid propagationPolicy "${policy}": supported values are Orphan, Background and Foreground`);
      }
      if (!cur.metadata.deletionTimestamp) {
        if (policy === 'Orphan' && !finalizers.includes('orphan')) finalizers.push('orphan');
        if (policy === 'Foreground' && !finalizers.includes('foregroundDeletion')) finalizers.push('foregroundDeletion');
      }
      try {
        if (finalizers.length > 0) {
          if (cur.metadata.deletionTimestamp && sameJson(finalizers, cur.metadata.finalizers)) {
            return { decoded: current, deleted: false };
          }
          const next = structuredClone(cur);
          next.metadata.finalizers = finalizers;
          next.metadata.deletionTimestamp ??= rfc3339(this.now());
          next.metadata['deletionGracePeriodSeconds'] = 0;
          if (ctx.dryRun) return { decoded: { obj: next, json: JSON.stringify(next), revision: current.revision }, deleted: false };
          const sv = await this.store.update(this.key(name), this.encode(next), current.revision);
          return { decoded: this.decode(sv), deleted: false };
        }
        if (ctx.dryRun) return { decoded: current, deleted: true };
        const sv = await this.store.delete(this.key(name), current.revision);
        const obj = structuredClone(cur);
        obj.metadata.resourceVersion = String(sv.modRevision);
        return { decoded: { obj, json: JSON.stringify(obj), revision: sv.modRevision }, deleted: true };
      } catch (err) {
        if (err instanceof StoreError && err.code === 'Conflict' && attempt < MAX_CONFLICT_RETRIES) continue;
        this.storeError(err, name);
      }
    }
  }

  async deleteCollection(list: ListParams, params: DeleteParams, ctx: RequestContext): Promise<ListResult> {
    const { items, resourceVersion } = await this.list({ ...list, limit: 0 });
    const out: Decoded[] = [];
    for (const item of items) {
      try {
        out.push((await this.delete(item.obj.metadata.name!, params, ctx)).decoded);
      } catch (err) {
        if (!(err instanceof ApiError && err.reason === 'NotFound')) throw err;
      }
    }
    return { items: out, resourceVersion };
  }

  /**
   * A filtered watch. Throws 410 Expired before streaming when the start revision was compacted;
   * errors later in the stream come as an ERROR item. Objects that stop (start) matching the
   * selectors are sent as DELETED (ADDED), as kube-apiserver does.
   */
  async watch(p: WatchParams, signal: AbortSignal): Promise<AsyncGenerator<WatchItem>> {
    // Everything that can fail with a plain error status runs before the stream starts.
    const { labels, fields } = this.selectors(p);
    const visible = new Set<string>();
    const rvParam = p.resourceVersion ?? '';
    const initial = p.sendInitialEvents === true || rvParam === '' || rvParam === '0';
    if (p.sendInitialEvents !== undefined && p.resourceVersionMatch !== 'NotOlderThan') {
      throw errors.invalid(this.groupResource, this.definition.kind, '', [
        toCause(fieldError.forbidden('sendInitialEvents', 'sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan')),
      ]);
    }
    let from: number;
    let seed: readonly Decoded[] = [];
    if (initial) {
      const snap = await this.list({
        ...(p.labelSelector ? { labelSelector: p.labelSelector } : {}),
        ...(p.fieldSelector ? { fieldSelector: p.fieldSelector } : {}),
      });
      from = Number(snap.resourceVersion);
      seed = snap.items;
    } else {
      from = parseRevision(rvParam, 'resourceVersion');
      if (!(labels.empty && fields.empty)) {
        try {
          const snap = await this.store.list(this.prefix, { atRevision: from });
          for (const sv of snap.items) if (this.matches(this.decode(sv).obj, labels, fields)) visible.add(sv.key);
        } catch {
          // Too old to seed: the watch below reports Expired.
        }
      }
    }
    let watcher: ReturnType<Store['watch']>;
    try {
      watcher = this.store.watch(this.prefix, { fromRevision: from, signal });
    } catch (err) {
      if (err instanceof StoreError && err.code === 'Expired') {
        const error = errors.expired(`too old resource version: ${from} (${await this.compactedRevision()})`);
        return (async function* () {
          yield { type: 'ERROR', error } as WatchItem;
        })();
      }
      this.storeError(err, '');
    }
    const self = this;
    return (async function* (): AsyncGenerator<WatchItem> {
      try {
        for (const d of seed) {
          visible.add(self.key(d.obj.metadata.name!));
          yield { type: 'ADDED', decoded: d };
        }
        if (p.sendInitialEvents && p.allowWatchBookmarks) {
          yield { type: 'BOOKMARK', resourceVersion: String(from), initialEventsEnd: true };
        }
        for await (const ev of watcher) {
          const item = self.filterEvent(ev, labels, fields, visible);
          if (item) yield item;
        }
      } catch (err) {
        if (signal.aborted) return;
        if (err instanceof StoreError && err.code === 'Expired') {
          yield { type: 'ERROR', error: errors.expired(`the watch fell behind and was closed, start a new watch: ${err.message}`) };
          return;
        }
        self.log.error({ err }, 'watch failed');
        yield { type: 'ERROR', error: errors.internal('watch failed', err) };
      } finally {
        watcher.close();
      }
    })();
  }

  private filterEvent(ev: StoreEvent, labels: LabelSelector, fields: FieldSelector, visible: Set<string>): WatchItem | undefined {
    const decoded = ev.type === 'DELETED' ? this.decodeDeleted(ev) : this.decode({ key: ev.key, value: ev.value, modRevision: ev.revision });
    if (labels.empty && fields.empty) return { type: ev.type, decoded };
    const was = visible.has(ev.key);
    const now = ev.type !== 'DELETED' && this.matches(decoded.obj, labels, fields);
    if (now) visible.add(ev.key);
    else visible.delete(ev.key);
    if (ev.type === 'DELETED') return was || this.matches(decoded.obj, labels, fields) ? { type: 'DELETED', decoded } : undefined;
    if (now && !was) return { type: 'ADDED', decoded };
    if (!now && was) return { type: 'DELETED', decoded };
    if (now) return { type: ev.type, decoded };
    return undefined;
  }

  /** Deletions are decoded once and shared by every watcher that sees them. */
  private decodeDeleted(ev: StoreEvent): Decoded {
    const id = `${ev.key}@${ev.revision}`;
    const hit = this.deletedCache.get(id);
    if (hit) return hit;
    const obj = JSON.parse(ev.value) as KubeObject;
    obj.metadata.resourceVersion = String(ev.revision);
    this.cache.delete(ev.key);
    const decoded: Decoded = { obj, json: JSON.stringify(obj), revision: ev.revision };
    this.deletedCache.set(id, decoded);
    if (this.deletedCache.size > DELETED_CACHE_SIZE) this.deletedCache.delete(this.deletedCache.keys().next().value!);
    return decoded;
  }

  /** Name of an object from its store key (for logs and metrics). */
  objectName(key: string): string {
    return this.nameOf(key);
  }
}
