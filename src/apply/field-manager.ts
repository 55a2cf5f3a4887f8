/**
 * Server-side apply and `metadata.managedFields`, as kube-apiserver does them
 * (k8s.io/apimachinery/pkg/util/managedfields/internal over sigs.k8s.io/structured-merge-diff),
 * for the single version of our kinds. See docs/adr/0003-server-side-apply.md for what is and is
 * not implemented.
 *
 * The kube layers reproduced, outermost first:
 *   - FieldManager.Apply / Update (`fieldmanager.go`): decode managedFields, `[]` or `[{}]` in an
 *     update resets them, a subresource never takes them from the request;
 *   - capManagersManager: at most 10 Update entries, the oldest merged into `ancient-changes`;
 *   - buildManagerInfoManager: one entry per (manager, operation, apiVersion for Update, subresource);
 *   - managedFieldsUpdater: times, and an Update entry keeps what it owned and gains what it changed;
 *   - stripMetaManager: apiVersion, kind, metadata identity fields are never owned;
 *   - merge.Updater (structured-merge-diff): merge, prune, conflicts, ownership transfer, with the
 *     strategy's reset fields ignored.
 */
import { FieldSet, FieldSetDecodeError, compareStrings, pathToString, type JsonObject } from './field-set.ts';
import { FieldManagerError, compileSchema, type MapType } from './type-info.ts';
import { compare, deepEqual, merge, prune, toFieldSet, type Comparison } from './typed.ts';

export type { JsonObject } from './field-set.ts';
export { FieldManagerError } from './type-info.ts';

export interface ManagedFieldsEntry {
  manager: string;
  operation: 'Apply' | 'Update';
  apiVersion: string;
  /**
   * RFC 3339, seconds precision, UTC. Optional as in kube: an entry a client wrote without one keeps
   * none. Entries written here always have one.
   */
  time?: string;
  fieldsType: 'FieldsV1';
  fieldsV1: JsonObject;
  subresource?: string;
}

export interface FieldConflict {
  /** The manager's name, as in its managedFields entry. */
  manager: string;
  /** Path like `.spec.kernelVersion` or `.status.modules[name="b",namespace="a"].statusReason`. */
  field: string;
  operation: 'Apply' | 'Update';
  /** Set for Update managers (kube prints it: `using <apiVersion>`). */
  apiVersion?: string;
  subresource?: string;
}

/** `metav1.StatusCause` of an apply conflict, as kube serialises it (`type` is sent as `reason`). */
export interface ConflictCause {
  reason: 'FieldManagerConflict';
  message: string;
  field: string;
}

/** Apply conflicts; the HTTP layer answers 409 (reason Conflict) with {@link conflictStatus}. */
export class ApplyConflictError extends Error {
  readonly conflicts: readonly FieldConflict[];
  constructor(conflicts: readonly FieldConflict[]) {
    super(formatConflictMessage(conflicts));
    this.name = 'ApplyConflictError';
    this.conflicts = conflicts;
  }
}

/** A request kube rejects with 400 BadRequest (e.g. managedFields in an apply body). */
export class ApplyBadRequestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ApplyBadRequestError';
  }
}

export interface FieldManagerOptions {
  /** JSON Schema of the whole object; see type-info.ts for how structure is read from it. */
  schema: JsonObject;
  /** `group/version` recorded in entries, e.g. `kmm.sigs.x-k8s.io/v1beta2`. */
  apiVersion: string;
  /**
   * Paths (lists of field names) whose changes a write through that endpoint neither records nor
   * takes ownership of, because the strategy resets them: kube's `GetResetFields`. For custom
   * resources with a status subresource kube uses {@link KUBE_CRD_RESET_FIELDS}.
   */
  resetFields: { main: string[][]; status: string[][] };
  now?: () => Date;
  /** Update entries kept before the oldest are merged into `ancient-changes` (kube: 10). */
  maxUpdateManagers?: number;
  /**
   * Called when update() cannot compute ownership (e.g. a map-list item without its key); the
   * object is then returned with the managedFields of `previous`, as kube's `UpdateNoErrors`.
   */
  onUpdateError?: (err: Error) => void;
}

/** kube's reset fields for a custom resource with a status subresource (customResourceStrategy, statusStrategy). */
export const KUBE_CRD_RESET_FIELDS: { main: string[][]; status: string[][] } = Object.freeze({
  main: [['status']],
  status: [['spec']],
});

export interface FieldManager {
  /**
   * Server-side apply. Returns the object to store with managedFields updated. When nothing changes
   * (neither the object nor managedFields) it returns `current` itself, so `result === current`
   * means "no write needed". Throws {@link ApplyConflictError} (unless `force`),
   * {@link ApplyBadRequestError}, or {@link FieldManagerError} for values the schema's list keys
   * cannot index (kube answers those 500 "failed to create typed patch object"). The result shares
   * unchanged subtrees with `current` and `applied`: treat all three as immutable.
   */
  apply(args: { current: JsonObject | undefined; applied: JsonObject; manager: string; force: boolean; subresource: '' | 'status' }): JsonObject;
  /** Records a non-apply write; returns a shallow copy of `next` with managedFields set. */
  update(args: { previous: JsonObject | undefined; next: JsonObject; manager: string; subresource: '' | 'status' }): JsonObject;
}

// -------------------------------------------------------------------------------------------------

const STRIP_SET = FieldSet.of(
  [
    ['f:apiVersion'],
    ['f:kind'],
    ['f:metadata'],
    ...[
      'name',
      'namespace',
      'creationTimestamp',
      'selfLink',
      'uid',
      'clusterName',
      'generation',
      'managedFields',
      'resourceVersion',
      // Not in kube's list (its delete path never runs the field manager), never owned here.
      'deletionTimestamp',
      'deletionGracePeriodSeconds',
    ].map((n) => ['f:metadata', 'f:' + n]),
  ],
);

const ANCIENT_CHANGES = 'ancient-changes';
const DEFAULT_MAX_UPDATE_MANAGERS = 10;

interface ManagerKey {
  manager: string;
  operation: 'Apply' | 'Update';
  /** Only part of the identity of Update managers. */
  apiVersion: string;
  subresource: string;
}

interface Entry {
  key: ManagerKey;
  set: FieldSet;
  /** Version the set was recorded in. */
  apiVersion: string;
  time: string | undefined;
}

type Managed = Map<string, Entry>;

/** `BuildManagerIdentifier`: the entry's JSON without fieldsType, fieldsV1, time (and apiVersion for Apply). */
function managerId(key: ManagerKey): string {
  const o: Record<string, string> = {};
  if (key.manager) o['manager'] = key.manager;
  o['operation'] = key.operation;
  if (key.operation === 'Update' && key.apiVersion) o['apiVersion'] = key.apiVersion;
  if (key.subresource) o['subresource'] = key.subresource;
  return JSON.stringify(o);
}

function isObj(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function optString(entry: JsonObject, k: string, index: number): string {
  const v = entry[k];
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') throw new FieldSetDecodeError(`managed fields entry ${index}: ${k} must be a string`);
  return v;
}

function decodeManagedFields(raw: unknown, trusted: boolean): Managed {
  const managed: Managed = new Map();
  if (raw === undefined || raw === null) return managed;
  if (!Array.isArray(raw)) throw new FieldSetDecodeError('managedFields must be a list');
  raw.forEach((e, i) => {
    if (!isObj(e)) throw new FieldSetDecodeError(`managed fields entry ${i} must be an object`);
    const operation = optString(e, 'operation', i);
    if (operation !== 'Apply' && operation !== 'Update') throw new FieldSetDecodeError('operation must be `Apply` or `Update`');
    const apiVersion = optString(e, 'apiVersion', i);
    if (apiVersion === '') throw new FieldSetDecodeError('apiVersion must not be empty');
    const fieldsType = optString(e, 'fieldsType', i);
    if (fieldsType === '') throw new FieldSetDecodeError(`missing fieldsType in managed fields entry ${i}`);
    if (fieldsType !== 'FieldsV1') throw new FieldSetDecodeError(`invalid fieldsType ${JSON.stringify(fieldsType)} in managed fields entry ${i}`);
    const fieldsV1 = e['fieldsV1'];
    let set: FieldSet;
    if (fieldsV1 === undefined || fieldsV1 === null) set = FieldSet.EMPTY;
    else if (trusted) {
      if (!isObj(fieldsV1)) throw new FieldSetDecodeError(`managed fields entry ${i}: fieldsV1 must be an object`);
      set = FieldSet.fromTrustedFieldsV1(fieldsV1);
    } else set = FieldSet.fromUntrustedFieldsV1(fieldsV1);
    const time = optString(e, 'time', i);
    const key: ManagerKey = { manager: optString(e, 'manager', i), operation, apiVersion, subresource: optString(e, 'subresource', i) };
    managed.set(managerId(key), { key, set, apiVersion, time: time || undefined });
  });
  return managed;
}

function timeSeconds(t: string | undefined): number {
  if (!t) return 0;
  const ms = Date.parse(t);
  return Number.isNaN(ms) ? 0 : Math.floor(ms / 1000);
}

function encodeManagedFields(managed: Managed): ManagedFieldsEntry[] {
  const out: ManagedFieldsEntry[] = [];
  for (const e of managed.values()) {
    const entry: ManagedFieldsEntry = { manager: e.key.manager, operation: e.key.operation, apiVersion: e.apiVersion } as ManagedFieldsEntry;
    if (e.time !== undefined) entry.time = e.time;
    entry.fieldsType = 'FieldsV1';
    entry.fieldsV1 = e.set.toFieldsV1();
    if (e.key.subresource) entry.subresource = e.key.subresource;
    out.push(entry);
  }
  // sortEncodedManagedFields
  return out.sort((p, q) => {
    if (p.operation !== q.operation) return p.operation < q.operation ? -1 : 1;
    const ps = timeSeconds(p.time);
    const qs = timeSeconds(q.time);
    if (ps !== qs) return ps < qs ? -1 : 1;
    if (p.manager !== q.manager) return compareStrings(p.manager, q.manager);
    if (p.apiVersion !== q.apiVersion) return compareStrings(p.apiVersion, q.apiVersion);
    return compareStrings(p.subresource ?? '', q.subresource ?? '');
  });
}

function formatTime(d: Date): string {
  return d.toISOString().replace(/\.\d+Z$/, 'Z');
}

function getManagedFields(obj: JsonObject | undefined): unknown {
  const meta = obj?.['metadata'];
  return isObj(meta) ? meta['managedFields'] : undefined;
}

function withoutManagedFields(obj: JsonObject): JsonObject {
  const meta = obj['metadata'];
  if (!isObj(meta) || !Object.prototype.hasOwnProperty.call(meta, 'managedFields')) return obj;
  const { managedFields: _, ...rest } = meta;
  return { ...obj, metadata: rest };
}

function withManagedFields(obj: JsonObject, entries: ManagedFieldsEntry[] | unknown): JsonObject {
  const meta = isObj(obj['metadata']) ? obj['metadata'] : undefined;
  const empty = entries === undefined || (Array.isArray(entries) && entries.length === 0);
  if (empty) {
    if (!meta || !Object.prototype.hasOwnProperty.call(meta, 'managedFields')) return obj;
    const { managedFields: _, ...rest } = meta;
    return { ...obj, metadata: rest };
  }
  return { ...obj, metadata: { ...(meta ?? {}), managedFields: entries } };
}

/** `isResetManagedFields`: a non-nil empty list, or a list of one empty entry. */
function isResetManagedFields(raw: unknown): boolean {
  if (!Array.isArray(raw)) return false;
  if (raw.length === 0) return true;
  if (raw.length !== 1) return false;
  const e: unknown = raw[0];
  if (!isObj(e)) return false;
  return Object.values(e).every((v) => v === undefined || v === null || v === '');
}

function pathsToSet(paths: string[][]): FieldSet {
  return FieldSet.of(paths.filter((p) => p.length > 0).map((p) => p.map((n) => 'f:' + n)));
}

function filterComparison(c: Comparison, reset: FieldSet): Comparison {
  if (reset.isEmpty()) return c;
  return {
    added: FieldSet.recursiveDifference(c.added, reset),
    modified: FieldSet.recursiveDifference(c.modified, reset),
    removed: FieldSet.recursiveDifference(c.removed, reset),
  };
}

// -------------------------------------------------------------------------------------------------
// Conflict reporting.

function printManager(c: FieldConflict): string {
  let s = JSON.stringify(c.manager);
  if (c.subresource) s += ` with subresource ${JSON.stringify(c.subresource)}`;
  if (c.operation === 'Update') s += ` using ${c.apiVersion ?? ''}`;
  return s;
}

function conflictManagerId(c: FieldConflict): string {
  return managerId({ manager: c.manager, operation: c.operation, apiVersion: c.apiVersion ?? '', subresource: c.subresource ?? '' });
}

/** The message of kube's 409 (`getConflictMessage` in managedfields/internal/conflict.go). */
export function formatConflictMessage(conflicts: readonly FieldConflict[]): string {
  if (conflicts.length === 1) {
    const c = conflicts[0] as FieldConflict;
    return `Apply failed with 1 conflict: conflict with ${printManager(c)}: ${c.field}`;
  }
  const byManager = new Map<string, FieldConflict[]>();
  for (const c of conflicts) {
    const id = conflictManagerId(c);
    const list = byManager.get(id);
    if (list) list.push(c);
    else byManager.set(id, [c]);
  }
  const messages: string[] = [];
  for (const id of [...byManager.keys()].sort(compareStrings)) {
    const list = byManager.get(id) as FieldConflict[];
    messages.push(`conflicts with ${printManager(list[0] as FieldConflict)}:`);
    for (const c of list) messages.push(`- ${c.field}`);
  }
  return `Apply failed with ${conflicts.length} conflicts: ${messages.join('\n')}`;
}

/** `details.causes` of kube's 409 (`NewConflictError`). */
export function conflictCauses(conflicts: readonly FieldConflict[]): ConflictCause[] {
  return conflicts.map((c) => ({ reason: 'FieldManagerConflict', message: `conflict with ${printManager(c)}`, field: c.field }));
}

/** The whole `metav1.Status` kube answers an apply conflict with (`errors.NewApplyConflict`). */
export function conflictStatus(conflicts: readonly FieldConflict[]): JsonObject {
  return {
    kind: 'Status',
    apiVersion: 'v1',
    metadata: {},
    status: 'Failure',
    message: formatConflictMessage(conflicts),
    reason: 'Conflict',
    details: { causes: conflictCauses(conflicts) },
    code: 409,
  };
}

// -------------------------------------------------------------------------------------------------

export function createFieldManager(options: FieldManagerOptions): FieldManager {
  const root: MapType = compileSchema(options.schema);
  const apiVersion = options.apiVersion;
  const now = options.now ?? (() => new Date());
  const maxUpdateManagers = options.maxUpdateManagers ?? DEFAULT_MAX_UPDATE_MANAGERS;
  const reset = { '': pathsToSet(options.resetFields.main), status: pathsToSet(options.resetFields.status) };

  const strip = (s: FieldSet) => FieldSet.difference(s, STRIP_SET);

  /**
   * merge.Updater.update: other managers lose what the write changed (conflicts, unless forced) and
   * what it removed.
   */
  const transferOwnership = (managed: Managed, selfId: string, c: Comparison, force: boolean): void => {
    const changed = FieldSet.union(c.modified, c.added);
    const conflicts: FieldConflict[] = [];
    const updates: Array<[string, FieldSet]> = [];
    for (const [id, e] of managed) {
      if (id === selfId) continue;
      const conflictSet = FieldSet.intersection(e.set, changed);
      if (!conflictSet.isEmpty()) {
        for (const path of conflictSet.paths()) {
          const fc: FieldConflict = { manager: e.key.manager, field: pathToString(path), operation: e.key.operation };
          if (e.key.operation === 'Update') fc.apiVersion = e.apiVersion;
          if (e.key.subresource) fc.subresource = e.key.subresource;
          conflicts.push(fc);
        }
      }
      updates.push([id, FieldSet.difference(FieldSet.difference(e.set, conflictSet), c.removed)]);
    }
    if (!force && conflicts.length > 0) {
      conflicts.sort((a, b) => compareStrings(conflictManagerId(a), conflictManagerId(b)));
      throw new ApplyConflictError(conflicts);
    }
    for (const [id, set] of updates) (managed.get(id) as Entry).set = set;
    for (const [id, e] of [...managed]) if (e.set.isEmpty()) managed.delete(id);
  };

  /** capManagersManager.capUpdateManagers */
  const capUpdateManagers = (managed: Managed): void => {
    const updaters = [...managed.entries()].filter(([, e]) => e.key.operation === 'Update');
    if (updaters.length <= maxUpdateManagers) return;
    updaters.sort(([ia, a], [ib, b]) => {
      const sa = timeSeconds(a.time);
      const sb = timeSeconds(b.time);
      if (sa !== sb) return sa < sb ? -1 : 1;
      return compareStrings(ia, ib);
    });
    const versionToFirst = new Map<string, string>();
    let length = updaters.length;
    for (let i = 0; i < updaters.length && length > maxUpdateManagers; i++) {
      const [id, e] = updaters[i] as [string, Entry];
      const version = e.apiVersion;
      const bucketKey: ManagerKey = { manager: ANCIENT_CHANGES, operation: 'Update', apiVersion: version, subresource: '' };
      const bucket = managerId(bucketKey);
      const first = versionToFirst.get(version);
      if (first === undefined) {
        versionToFirst.set(version, id);
        continue;
      }
      if (!managed.has(bucket)) {
        const f = managed.get(first) as Entry;
        managed.delete(first);
        managed.set(bucket, { key: bucketKey, set: f.set, apiVersion: f.apiVersion, time: f.time });
      }
      const b = managed.get(bucket) as Entry;
      managed.set(bucket, { key: bucketKey, set: FieldSet.union(e.set, b.set), apiVersion: version, time: e.time });
      if (id !== bucket) managed.delete(id);
      length--;
    }
  };

  return {
    apply({ current, applied, manager, force, subresource }) {
      const appliedMeta = applied['metadata'];
      if (isObj(appliedMeta) && appliedMeta['managedFields'] !== undefined && appliedMeta['managedFields'] !== null) {
        throw new ApplyBadRequestError('metadata.managedFields must be nil');
      }
      const live: JsonObject = current ?? { apiVersion: applied['apiVersion'], kind: applied['kind'] };
      const liveRaw = getManagedFields(current);
      let managed: Managed;
      try {
        managed = decodeManagedFields(liveRaw, true);
      } catch (err) {
        throw new Error(`failed to decode managed fields: ${(err as Error).message}`, { cause: err });
      }
      const liveBare = withoutManagedFields(live);
      const config = withoutManagedFields(applied);
      const resetSet = reset[subresource];

      // merge.Updater.Apply
      const key: ManagerKey = { manager: manager || 'unknown', operation: 'Apply', apiVersion: '', subresource };
      const id = managerId(key);
      const configSet = FieldSet.recursiveDifference(toFieldSet(config, root), resetSet);
      let merged = merge(liveBare, config, root) as JsonObject;
      const last = managed.get(id);
      const self: Entry = { key, set: configSet, apiVersion, time: last?.time };
      managed.set(id, self);
      if (last && !last.set.isEmpty()) {
        merged = prune(merged, root, last.set, [...managed.values()].map((e) => e.set)) as JsonObject;
      }
      transferOwnership(managed, id, filterComparison(compare(liveBare, merged, root), resetSet), force);

      // stripMetaManager, managedFieldsUpdater
      const changed = !deepEqual(liveBare, merged);
      if (managed.has(id)) {
        self.set = strip(self.set);
        if (self.set.isEmpty()) managed.delete(id);
        else if (changed || !last) self.time = formatTime(now());
      }
      const encoded = encodeManagedFields(managed);
      if (!changed && current !== undefined && deepEqual(encoded, liveRaw ?? [])) return current;
      return withManagedFields(changed ? merged : liveBare, encoded);
    },

    update({ previous, next, manager, subresource }) {
      const liveRaw = getManagedFields(previous);
      // decodeLiveOrNew
      let managed: Managed;
      const decodeLive = () => {
        try {
          return decodeManagedFields(liveRaw, true);
        } catch {
          return new Map() as Managed;
        }
      };
      const nextRaw = getManagedFields(next);
      if (subresource !== '') managed = decodeLive();
      else if (isResetManagedFields(nextRaw)) managed = new Map();
      else if (nextRaw === undefined || nextRaw === null || deepEqual(nextRaw, liveRaw)) managed = decodeLive();
      else {
        try {
          managed = decodeManagedFields(nextRaw, false);
        } catch {
          managed = new Map();
        }
        if (managed.size === 0) managed = decodeLive();
      }

      try {
        const live: JsonObject = previous ?? { apiVersion: next['apiVersion'], kind: next['kind'] };
        const resetSet = reset[subresource];
        const c = filterComparison(compare(withoutManagedFields(live), withoutManagedFields(next), root), resetSet);
        // merge.Updater.Update for the "current-operation" manager, then managedFieldsUpdater.
        transferOwnership(managed, '', c, true);
        const current = strip(FieldSet.difference(FieldSet.union(c.modified, c.added), c.removed));
        if (!current.isEmpty()) {
          const key: ManagerKey = { manager: manager || 'unknown', operation: 'Update', apiVersion, subresource };
          const id = managerId(key);
          const prev = managed.get(id);
          managed.set(id, { key, set: prev ? FieldSet.union(current, prev.set) : current, apiVersion, time: formatTime(now()) });
        }
        capUpdateManagers(managed);
        return withManagedFields(next, encodeManagedFields(managed));
      } catch (err) {
        if (!(err instanceof FieldManagerError) && !(err instanceof FieldSetDecodeError)) throw err;
        options.onUpdateError?.(err);
        return withManagedFields(next, liveRaw);
      }
    },
  };
}
