/**
 * The narrow storage interface every backend implements (embedded SQLite, etcd).
 *
 * The model is etcd's MVCC: one monotonically increasing revision for the whole store; every
 * write creates a new revision; a key's history is kept until compaction. `resourceVersion` of an
 * object is the revision of its last modification, and the resourceVersion of a list is the store
 * revision at which it was read.
 *
 * Values are opaque JSON text: the API layer owns encoding and sets `metadata.resourceVersion` from
 * `modRevision` when it decodes. Backends never parse values.
 */

/** A stored object as read back: its JSON text and the revision of its last modification. */
export interface StoredValue {
  readonly key: string;
  /** JSON text of the object as written (its `metadata.resourceVersion` is not meaningful). */
  readonly value: string;
  readonly modRevision: number;
}

export type WatchEventType = 'ADDED' | 'MODIFIED' | 'DELETED';

export interface StoreEvent {
  readonly type: WatchEventType;
  readonly key: string;
  /** For DELETED, the last value before deletion. */
  readonly value: string;
  /** Revision at which this event happened. */
  readonly revision: number;
}

export interface ListOptions {
  /** Only keys strictly greater than this key (used for continue tokens). */
  readonly startAfter?: string;
  /** At most this many items; 0 or undefined means all. */
  readonly limit?: number;
  /**
   * Read as of this revision (a consistent snapshot for paginated lists).
   * Throws {@link StoreError} `Expired` when the revision was compacted.
   */
  readonly atRevision?: number;
  /** Optional filter applied before the limit is counted. */
  readonly filter?: (value: StoredValue) => boolean;
}

export interface ListResult {
  readonly items: readonly StoredValue[];
  /** Revision the list was read at. */
  readonly revision: number;
  /** True when more matching items exist after the last one returned. */
  readonly more: boolean;
}

export interface Watcher extends AsyncIterable<StoreEvent> {
  /** Stops the watch; the iterator ends. */
  close(): void;
}

export interface WatchOptions {
  /** Deliver events with revision strictly greater than this. Throws `Expired` when compacted. */
  readonly fromRevision: number;
  readonly signal?: AbortSignal;
}

export type StoreErrorCode = 'NotFound' | 'AlreadyExists' | 'Conflict' | 'Expired' | 'Unavailable' | 'TooLarge';

export class StoreError extends Error {
  readonly code: StoreErrorCode;
  constructor(code: StoreErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'StoreError';
    this.code = code;
  }
}

export interface Store {
  /** Human name of the backend, for logs and /readyz. */
  readonly name: string;

  get(key: string): Promise<StoredValue | undefined>;

  /** Keys under `prefix`, ordered by key. */
  list(prefix: string, options?: ListOptions): Promise<ListResult>;

  /** Fails with `AlreadyExists` when the key exists. */
  create(key: string, value: string): Promise<StoredValue>;

  /**
   * Replaces the value only if the key's modRevision equals `expectedRevision`;
   * otherwise fails with `Conflict` (or `NotFound` when the key is gone).
   */
  update(key: string, value: string, expectedRevision: number): Promise<StoredValue>;

  /** Deletes only if the modRevision equals `expectedRevision` (when given). Returns the deleted value. */
  delete(key: string, expectedRevision?: number): Promise<StoredValue>;

  /** Events for keys under `prefix` after `fromRevision`, then live ones, in revision order. */
  watch(prefix: string, options: WatchOptions): Watcher;

  /** The store's current revision. */
  currentRevision(): Promise<number>;

  /** Oldest revision from which a watch or a snapshot read can still start. */
  compactedRevision(): Promise<number>;

  /** Throws when the backend cannot serve (for /readyz). */
  ping(): Promise<void>;

  close(): Promise<void>;
}
