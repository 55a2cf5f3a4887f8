/**
 * Embedded storage backend: one SQLite file holding an etcd-like MVCC revision table.
 *
 * Every write appends a row `(key, revision, deleted, create_revision, ts, value)`; a key's current
 * state is its newest row. Reads at an older revision pick the newest row at or below it, and
 * watches replay rows in revision order, so list + watch resume works exactly as against etcd until
 * a compaction removes the history a client needs (then {@link StoreError} `Expired`, i.e. HTTP 410).
 *
 * The process that opens the file is assumed to be its only writer: live watch events come from
 * this process's own commits. The busy timeout only covers short-lived outside readers (backups,
 * the sqlite3 shell) and WAL checkpoints.
 *
 * @see docs/adr/0002-embedded-storage-sqlite.md
 */
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync, type SQLOutputValue, type StatementSync } from 'node:sqlite';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import {
  StoreError,
  type ListOptions,
  type ListResult,
  type Store,
  type StoreEvent,
  type StoredValue,
  type WatchEventType,
  type Watcher,
  type WatchOptions,
} from './store.ts';

/** Options of {@link SqliteStore}. Only `path` is required. */
export interface SqliteStoreOptions {
  /** Database file; its directory is created when missing. */
  readonly path: string;
  /**
   * Keep at most this many revisions of history (default 10,000). History is kept only while it is
   * inside *both* windows, so the tighter of `historyRevisions` and `historySeconds` wins; this
   * bounds disk use when values are megabytes. `Infinity` disables this bound.
   */
  readonly historyRevisions?: number;
  /** Keep history written in the last this many seconds (default 300). `Infinity` disables this bound. */
  readonly historySeconds?: number;
  /** How often the background compaction runs (default 60,000 ms); 0 disables it. */
  readonly compactIntervalMs?: number;
  /** How long a write waits for a lock held by another connection (default 5,000 ms). */
  readonly busyTimeoutMs?: number;
  /**
   * A watcher that has this many undelivered events is ended with `Expired` (default 10,000), so a
   * slow consumer cannot hold memory or block writers; the client re-lists, as with kube-apiserver.
   */
  readonly watchMaxBufferedEvents?: number;
  /** Same as `watchMaxBufferedEvents`, counted in characters of key + value (default 128 MiB). */
  readonly watchMaxBufferedBytes?: number;
  /** History rows read per step of a watch replay (default 256; also capped at ~8 MiB of values). */
  readonly watchReplayPageSize?: number;
  /** Writes with a larger value (UTF-8 bytes) fail with `TooLarge` (default 32 MiB). */
  readonly maxValueBytes?: number;
  /** Receives errors of the background compaction, which otherwise has nobody to report to. */
  readonly onBackgroundError?: (error: Error) => void;
  /** Clock in epoch milliseconds, for the time window (tests inject one). */
  readonly now?: () => number;
}

const SCHEMA_VERSION = 1;
const COMPACT_BATCH_REVISIONS = 1000;
const REPLAY_PAGE_BYTES = 8 * 1024 * 1024;

// Keys are compared by SQLite as UTF-8 bytes. No valid UTF-8 text contains the byte 0xFF, so
// `prefix || 0xFF` is an exclusive upper bound for every key that starts with `prefix`, which lets a
// prefix scan be an index range instead of a LIKE (LIKE is case-insensitive and treats `_`/`%`).
const PREFIX_END = `(:prefix || CAST(X'FF' AS TEXT))`;

/**
 * {@link Store} on a single SQLite file (via `node:sqlite`), in WAL mode with `synchronous=FULL`:
 * a write is acknowledged only after its WAL frame is fsynced, so it survives a kill -9 of the
 * process and a power loss.
 *
 * All SQLite calls are synchronous, so each method body runs without interleaving with other
 * JavaScript; that is what makes a write and the delivery of its watch event atomic.
 */
export class SqliteStore implements Store {
  readonly name = 'sqlite';
  /** The database file. */
  readonly path: string;

  readonly #db: DatabaseSync;
  readonly #stmts: Statements;
  readonly #historyRevisions: number;
  readonly #historySeconds: number;
  readonly #maxValueBytes: number;
  readonly #watcherLimits: WatcherLimits;
  readonly #now: () => number;
  readonly #onBackgroundError: ((error: Error) => void) | undefined;
  readonly #watchers = new Set<SqliteWatcher>();
  readonly #timer: NodeJS.Timeout | undefined;

  #revision: number;
  #compacted: number;
  /** Compaction has physically removed history up to here; lags `#compacted` while it runs. */
  #compactScanned: number;
  #compactChain: Promise<unknown> = Promise.resolve();
  #autoCompacting = false;
  #closed = false;

  /**
   * Opens (creating when missing) the database file. Synchronous; throws {@link StoreError}
   * `Unavailable` when the file cannot be opened or set up. Prefer {@link openSqliteStore}.
   */
  constructor(options: SqliteStoreOptions) {
    this.path = options.path;
    this.#historyRevisions = nonNegative('historyRevisions', options.historyRevisions ?? 10_000);
    this.#historySeconds = nonNegative('historySeconds', options.historySeconds ?? 300);
    this.#maxValueBytes = nonNegative('maxValueBytes', options.maxValueBytes ?? 32 * 1024 * 1024);
    this.#watcherLimits = {
      maxEvents: nonNegative('watchMaxBufferedEvents', options.watchMaxBufferedEvents ?? 10_000),
      maxBytes: nonNegative('watchMaxBufferedBytes', options.watchMaxBufferedBytes ?? 128 * 1024 * 1024),
      pageSize: Math.max(1, nonNegative('watchReplayPageSize', options.watchReplayPageSize ?? 256)),
    };
    const clock = options.now ?? Date.now;
    // ts is an INTEGER column of a STRICT table.
    this.#now = () => Math.floor(clock());
    this.#onBackgroundError = options.onBackgroundError;
    const busyTimeoutMs = nonNegative('busyTimeoutMs', options.busyTimeoutMs ?? 5_000);
    const compactIntervalMs = nonNegative('compactIntervalMs', options.compactIntervalMs ?? 60_000);

    let db: DatabaseSync | undefined;
    try {
      if (this.path !== ':memory:') mkdirSync(dirname(this.path), { recursive: true });
      db = new DatabaseSync(this.path, { timeout: busyTimeoutMs });
      setUp(db);
      this.#stmts = prepareStatements(db);
      this.#compacted = readMeta(this.#stmts, 'compacted');
      this.#compactScanned = readMeta(this.#stmts, 'compact_scanned');
      this.#revision = Math.max(int(this.#stmts.maxRevision.get()?.revision ?? 0), this.#compacted);
    } catch (error) {
      try {
        db?.close();
      } catch {
        // Already failing; the original error is the useful one.
      }
      throw toStoreError(error, `cannot open SQLite store at ${this.path}`);
    }
    this.#db = db;

    if (compactIntervalMs > 0) {
      this.#timer = setInterval(() => void this.#autoCompact(), compactIntervalMs);
      // A periodic housekeeping timer must not keep the process alive on its own.
      this.#timer.unref();
    }
    // A crash during a compaction leaves history below `compacted` half removed; finish it.
    if (this.#compactScanned < this.#compacted) {
      this.#runCompaction(this.#compacted).catch((error: unknown) => this.#reportBackground(error));
    }
  }

  /** Number of open watchers (for metrics and tests). */
  get activeWatchers(): number {
    return this.#watchers.size;
  }

  async get(key: string): Promise<StoredValue | undefined> {
    return this.#op(() => {
      const row = this.#stmts.latest.get({ key });
      if (row === undefined || int(row.deleted) !== 0) return undefined;
      return { key, value: text(row.value), modRevision: int(row.revision) };
    });
  }

  /**
   * Keys under `prefix` ordered by key (UTF-8 byte order, which equals JavaScript order for ASCII).
   * `atRevision` of 0 or undefined, or above the current revision, reads the current state.
   * Rejects with `Expired` when `atRevision` is below {@link compactedRevision}. The filter runs
   * while the query is open and must not call back into the store.
   */
  async list(prefix: string, options: ListOptions = {}): Promise<ListResult> {
    return this.#op(() => {
      const { startAfter, limit = 0, filter } = options;
      let revision = this.#revision;
      if (options.atRevision !== undefined && options.atRevision > 0 && options.atRevision < revision) {
        if (options.atRevision < this.#compacted) {
          throw new StoreError(
            'Expired',
            `revision ${options.atRevision} has been compacted (oldest available: ${this.#compacted})`,
          );
        }
        revision = options.atRevision;
      }
      // Start the index range at whichever lower bound is tighter, so every page of a paginated
      // list is a seek rather than a scan from the start of the prefix.
      const afterIsTighter = startAfter !== undefined && Buffer.compare(Buffer.from(startAfter), Buffer.from(prefix)) >= 0;
      const rows = afterIsTighter
        ? this.#stmts.listAfter.iterate({ prefix, lower: startAfter, revision })
        : this.#stmts.listFrom.iterate({ prefix, revision });
      const items: StoredValue[] = [];
      let more = false;
      for (const row of rows) {
        const item: StoredValue = { key: text(row.key), value: text(row.value), modRevision: int(row.revision) };
        if (filter !== undefined && !callUser(filter, item)) continue;
        if (limit > 0 && items.length >= limit) {
          more = true;
          break; // leaving the loop resets the statement
        }
        items.push(item);
      }
      return { items, revision, more };
    });
  }

  async create(key: string, value: string): Promise<StoredValue> {
    return this.#op(() => {
      this.#checkValue(key, value);
      const event = this.#write((): StoreEvent => {
        const latest = this.#stmts.latestMeta.get({ key });
        if (latest !== undefined && int(latest.deleted) === 0) {
          throw new StoreError('AlreadyExists', `${key} already exists`);
        }
        const revision = this.#nextRevision();
        this.#stmts.insert.run({ key, revision, deleted: 0, createRevision: revision, ts: this.#now(), value });
        return { type: 'ADDED', key, value, revision };
      });
      this.#committed(event);
      return { key, value, modRevision: event.revision };
    });
  }

  async update(key: string, value: string, expectedRevision: number): Promise<StoredValue> {
    return this.#op(() => {
      this.#checkValue(key, value);
      const event = this.#write((): StoreEvent => {
        const latest = this.#stmts.latestMeta.get({ key });
        if (latest === undefined || int(latest.deleted) !== 0) throw new StoreError('NotFound', `${key} not found`);
        const current = int(latest.revision);
        if (current !== expectedRevision) {
          throw new StoreError('Conflict', `${key} is at revision ${current}, not ${expectedRevision}`);
        }
        const revision = this.#nextRevision();
        this.#stmts.insert.run({
          key,
          revision,
          deleted: 0,
          createRevision: int(latest.create_revision),
          ts: this.#now(),
          value,
        });
        return { type: 'MODIFIED', key, value, revision };
      });
      this.#committed(event);
      return { key, value, modRevision: event.revision };
    });
  }

  /** Returns the deleted value with `modRevision` set to the revision of the deletion. */
  async delete(key: string, expectedRevision?: number): Promise<StoredValue> {
    return this.#op(() => {
      const event = this.#write((): StoreEvent => {
        const latest = this.#stmts.latest.get({ key });
        if (latest === undefined || int(latest.deleted) !== 0) throw new StoreError('NotFound', `${key} not found`);
        const current = int(latest.revision);
        if (expectedRevision !== undefined && current !== expectedRevision) {
          throw new StoreError('Conflict', `${key} is at revision ${current}, not ${expectedRevision}`);
        }
        const revision = this.#nextRevision();
        const value = text(latest.value);
        // The tombstone keeps the last value so that a replayed DELETED event can carry it even
        // after compaction removed the row it replaced.
        this.#stmts.insert.run({
          key,
          revision,
          deleted: 1,
          createRevision: int(latest.create_revision),
          ts: this.#now(),
          value,
        });
        return { type: 'DELETED', key, value, revision };
      });
      this.#committed(event);
      return { key, value: event.value, modRevision: event.revision };
    });
  }

  /**
   * Replays stored events after `fromRevision` for keys under `prefix`, then live ones, in
   * revision order without gaps or duplicates. `fromRevision` 0 means "from now" (no replay).
   *
   * Throws {@link StoreError} synchronously, before anything is streamed, when the watch cannot
   * start: `Expired` when `fromRevision` is below {@link compactedRevision} (answer 410),
   * `Unavailable` when the store is closed. Errors found later end the iteration instead:
   * `Expired` when the consumer fell too far behind (buffer limits) or a compaction overtook the
   * replay, `Unavailable` on a database error. Closing the store ends all watchers normally.
   *
   * @throws RangeError when `fromRevision` is not a non-negative integer.
   */
  watch(prefix: string, options: WatchOptions): Watcher {
    const { fromRevision, signal } = options;
    if (!Number.isSafeInteger(fromRevision) || fromRevision < 0) {
      throw new RangeError(`fromRevision must be a non-negative integer, got ${fromRevision}`);
    }
    if (this.#closed) throw new StoreError('Unavailable', 'store is closed');
    if (fromRevision !== 0 && fromRevision < this.#compacted) {
      throw new StoreError(
        'Expired',
        `revision ${fromRevision} has been compacted (oldest available: ${this.#compacted})`,
      );
    }
    // Subscribing and taking the replay bound happen in one synchronous step, so every later
    // commit reaches the live queue and every earlier one is in the history the replay reads.
    const until = this.#revision;
    const start = fromRevision === 0 ? until : fromRevision;
    const watcher = new SqliteWatcher({
      prefix,
      start,
      until,
      limits: this.#watcherLimits,
      readHistory: (after, upTo) => this.#readHistory(prefix, after, upTo),
      release: (w) => this.#watchers.delete(w),
      signal,
    });
    if (!watcher.finished) this.#watchers.add(watcher);
    return watcher;
  }

  async currentRevision(): Promise<number> {
    return this.#op(() => this.#revision);
  }

  async compactedRevision(): Promise<number> {
    return this.#op(() => this.#compacted);
  }

  async ping(): Promise<void> {
    this.#op(() => this.#stmts.ping.get());
  }

  /**
   * Discards history below `revision`: rows superseded by a newer row at or below it, and
   * tombstones at or below it. Reads and watches from `revision` onwards stay exact; older ones
   * get `Expired`. A no-op when already compacted that far. Resolves with the compacted revision.
   * Rejects with a RangeError for a revision above the current one.
   */
  async compact(revision: number): Promise<number> {
    this.#op(() => {
      if (!Number.isSafeInteger(revision) || revision < 0) {
        throw new RangeError(`revision must be a non-negative integer, got ${revision}`);
      }
      if (revision > this.#revision) {
        throw new RangeError(`cannot compact to revision ${revision}: current revision is ${this.#revision}`);
      }
    });
    return this.#runCompaction(revision);
  }

  /** Stops the compaction timer, ends all watchers, waits for a running compaction step, closes the file. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    for (const watcher of [...this.#watchers]) watcher.close();
    this.#watchers.clear();
    await this.#compactChain.catch(() => {});
    try {
      this.#db.close();
    } catch (error) {
      throw toStoreError(error, 'closing the SQLite store failed');
    }
  }

  /** Runs `fn` on an open store, turning SQLite failures into `Unavailable`. */
  #op<T>(fn: () => T): T {
    if (this.#closed) throw new StoreError('Unavailable', 'store is closed');
    try {
      return fn();
    } catch (error) {
      if (error instanceof UserCallbackError) throw error.cause;
      if (error instanceof RangeError) throw error; // argument validation, not a store failure
      throw toStoreError(error, 'SQLite operation failed');
    }
  }

  #checkValue(key: string, value: string): void {
    const bytes = Buffer.byteLength(value);
    if (bytes > this.#maxValueBytes) {
      throw new StoreError('TooLarge', `value of ${key} is ${bytes} bytes, limit is ${this.#maxValueBytes}`);
    }
  }

  /** Runs `fn` in a write transaction. IMMEDIATE takes the write lock up front, so the read-check-write is atomic across connections too. */
  #write<T>(fn: () => T): T {
    this.#db.exec('BEGIN IMMEDIATE');
    try {
      const result = fn();
      this.#db.exec('COMMIT');
      return result;
    } catch (error) {
      if (this.#db.isTransaction) {
        try {
          this.#db.exec('ROLLBACK');
        } catch {
          // The original error matters more; SQLite rolls back on its own if this fails.
        }
      }
      throw error;
    }
  }

  /**
   * Next revision, derived from the file inside the write transaction rather than from memory so
   * a row can never be written under a revision that already exists. `compacted` is included
   * because compaction may have removed the newest rows (a deleted key's tombstone).
   */
  #nextRevision(): number {
    const max = int(this.#stmts.maxRevision.get()?.revision ?? 0);
    return Math.max(max, this.#compacted, this.#revision) + 1;
  }

  /** Publishes a committed write: only after COMMIT returned is it durable and visible. */
  #committed(event: StoreEvent): void {
    this.#revision = event.revision;
    for (const watcher of this.#watchers) {
      if (event.key.startsWith(watcher.prefix)) watcher.push(event);
    }
  }

  /** One page of history for a watcher; `Expired` when compaction may have removed part of it. */
  #readHistory(prefix: string, after: number, upTo: number): StoreEvent[] {
    if (this.#closed) throw new StoreError('Unavailable', 'store is closed');
    if (after < this.#compacted) {
      throw new StoreError(
        'Expired',
        `watch replay fell behind compaction (at revision ${after}, compacted to ${this.#compacted})`,
      );
    }
    try {
      const events: StoreEvent[] = [];
      let bytes = 0;
      const rows = this.#stmts.history.iterate({ prefix, after, upTo, limit: this.#watcherLimits.pageSize });
      for (const row of rows) {
        const revision = int(row.revision);
        const value = text(row.value);
        const type: WatchEventType =
          int(row.deleted) !== 0 ? 'DELETED' : int(row.create_revision) === revision ? 'ADDED' : 'MODIFIED';
        events.push({ type, key: text(row.key), value, revision });
        bytes += value.length;
        if (bytes >= REPLAY_PAGE_BYTES) break;
      }
      return events;
    } catch (error) {
      throw toStoreError(error, 'reading watch history failed');
    }
  }

  async #autoCompact(): Promise<void> {
    if (this.#closed || this.#autoCompacting) return;
    this.#autoCompacting = true;
    try {
      const target = this.#op(() => this.#compactionTarget());
      if (target > this.#compacted) await this.#runCompaction(target);
    } catch (error) {
      this.#reportBackground(error);
    } finally {
      this.#autoCompacting = false;
    }
  }

  #reportBackground(error: unknown): void {
    if (!this.#closed) this.#onBackgroundError?.(error instanceof Error ? error : new Error(String(error)));
  }

  /** The newest revision outside the history window: the tighter of the revision and time bounds. */
  #compactionTarget(): number {
    let target = this.#compacted;
    if (Number.isFinite(this.#historyRevisions)) {
      target = Math.max(target, this.#revision - this.#historyRevisions);
    }
    if (Number.isFinite(this.#historySeconds)) {
      const cutoff = this.#now() - this.#historySeconds * 1000;
      const row = this.#stmts.newestBefore.get({ after: target, cutoff });
      if (row !== undefined) target = Math.max(target, int(row.revision));
    }
    return Math.min(target, this.#revision);
  }

  /** Serializes compactions; the work itself is in batches so writers are not blocked for long. */
  #runCompaction(revision: number): Promise<number> {
    const run = this.#compactChain.then(() => this.#compactSteps(revision));
    this.#compactChain = run.catch(() => {});
    return run;
  }

  async #compactSteps(revision: number): Promise<number> {
    this.#op(() => {
      if (revision > this.#compacted) {
        // Raise the horizon before deleting anything: from here on reads and watches below it
        // fail with Expired instead of seeing half-removed history.
        this.#write(() => this.#stmts.setMeta.run({ name: 'compacted', value: revision }));
        this.#compacted = revision;
      }
    });
    while (this.#compactScanned < this.#compacted) {
      if (this.#closed) break; // the persisted progress lets the next open resume
      const lo = this.#compactScanned;
      const hi = Math.min(lo + COMPACT_BATCH_REVISIONS, this.#compacted);
      this.#op(() =>
        this.#write(() => {
          this.#stmts.compactBatch.run({ lo, hi, compacted: this.#compacted });
          this.#stmts.setMeta.run({ name: 'compact_scanned', value: hi });
        }),
      );
      this.#compactScanned = hi;
      await yieldToEventLoop();
    }
    return this.#compacted;
  }
}

/** Opens a {@link SqliteStore}; rejects with {@link StoreError} `Unavailable` when it cannot. */
export async function openSqliteStore(options: SqliteStoreOptions): Promise<SqliteStore> {
  return new SqliteStore(options);
}

interface Statements {
  readonly ping: StatementSync;
  readonly maxRevision: StatementSync;
  readonly latest: StatementSync;
  readonly latestMeta: StatementSync;
  readonly insert: StatementSync;
  readonly listFrom: StatementSync;
  readonly listAfter: StatementSync;
  readonly history: StatementSync;
  readonly newestBefore: StatementSync;
  readonly compactBatch: StatementSync;
  readonly getMeta: StatementSync;
  readonly setMeta: StatementSync;
}

function setUp(db: DatabaseSync): void {
  const mode = db.prepare('PRAGMA journal_mode = WAL').get()?.journal_mode;
  if (mode !== 'wal') throw new Error(`cannot enable WAL journal mode (got ${String(mode)})`);
  // FULL fsyncs the WAL on every commit; NORMAL (the usual WAL setting) may lose the last commits
  // on power loss, and an acknowledged write must never be lost.
  db.exec('PRAGMA synchronous = FULL');
  // Checkpoints leave the WAL file at its peak size; multi-megabyte values would make that large.
  db.exec('PRAGMA journal_size_limit = 67108864');
  db.exec(`
    CREATE TABLE IF NOT EXISTS meta (
      name TEXT PRIMARY KEY,
      value INTEGER NOT NULL
    ) STRICT;
    -- One row per write. The revision is the rowid, so revision-ordered scans (watch replay,
    -- compaction) need no extra index. value is last so that reading the small columns of a
    -- superseded row never touches the overflow pages of a multi-megabyte value.
    CREATE TABLE IF NOT EXISTS kv (
      revision INTEGER PRIMARY KEY,
      key TEXT NOT NULL,
      deleted INTEGER NOT NULL,
      create_revision INTEGER NOT NULL,
      ts INTEGER NOT NULL,
      value TEXT NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX IF NOT EXISTS kv_key_revision ON kv (key, revision, deleted);
    INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ${SCHEMA_VERSION});
    INSERT OR IGNORE INTO meta (name, value) VALUES ('compacted', 0);
    INSERT OR IGNORE INTO meta (name, value) VALUES ('compact_scanned', 0);
  `);
  const version = db.prepare(`SELECT value FROM meta WHERE name = 'schema_version'`).get()?.value;
  if (version !== SCHEMA_VERSION) throw new Error(`unsupported schema version ${String(version)}`);
}

function prepareStatements(db: DatabaseSync): Statements {
  // Latest row of each key at or below :revision, skipping deleted keys, in key order.
  const listTail = `
      AND a.revision <= :revision AND a.deleted = 0
      AND NOT EXISTS (SELECT 1 FROM kv AS b WHERE b.key = a.key AND b.revision > a.revision AND b.revision <= :revision)
    ORDER BY a.key`;
  return {
    ping: db.prepare('SELECT 1 AS ok'),
    maxRevision: db.prepare('SELECT max(revision) AS revision FROM kv'),
    latest: db.prepare('SELECT revision, deleted, create_revision, value FROM kv WHERE key = :key ORDER BY revision DESC LIMIT 1'),
    latestMeta: db.prepare('SELECT revision, deleted, create_revision FROM kv WHERE key = :key ORDER BY revision DESC LIMIT 1'),
    insert: db.prepare(
      `INSERT INTO kv (revision, key, deleted, create_revision, ts, value)
       VALUES (:revision, :key, :deleted, :createRevision, :ts, :value)`,
    ),
    listFrom: db.prepare(
      `SELECT a.key, a.revision, a.value FROM kv AS a
       WHERE a.key >= :prefix AND a.key < ${PREFIX_END} ${listTail}`,
    ),
    listAfter: db.prepare(
      `SELECT a.key, a.revision, a.value FROM kv AS a
       WHERE a.key > :lower AND a.key < ${PREFIX_END} ${listTail}`,
    ),
    // `+key` keeps the planner on the rowid (revision) range instead of the key index, which would
    // need a sort and read the whole prefix.
    history: db.prepare(
      `SELECT revision, key, deleted, create_revision, value FROM kv
       WHERE revision > :after AND revision <= :upTo AND +key >= :prefix AND +key < ${PREFIX_END}
       ORDER BY revision LIMIT :limit`,
    ),
    newestBefore: db.prepare(
      'SELECT revision FROM kv WHERE revision > :after AND ts <= :cutoff ORDER BY revision DESC LIMIT 1',
    ),
    // For the keys written in (lo, hi], remove tombstones and rows superseded at or below the
    // compacted revision. Every superseding row is visited once as the batches advance, so history
    // older than the previous compaction is never rescanned.
    compactBatch: db.prepare(
      `DELETE FROM kv
       WHERE key IN (SELECT key FROM kv WHERE revision > :lo AND revision <= :hi)
         AND revision <= :compacted
         AND (deleted = 1 OR EXISTS (
           SELECT 1 FROM kv AS newer
           WHERE newer.key = kv.key AND newer.revision > kv.revision AND newer.revision <= :compacted))`,
    ),
    getMeta: db.prepare('SELECT value FROM meta WHERE name = :name'),
    setMeta: db.prepare('UPDATE meta SET value = :value WHERE name = :name'),
  };
}

function readMeta(stmts: Statements, name: string): number {
  return int(stmts.getMeta.get({ name })?.value ?? 0);
}

interface WatcherLimits {
  readonly maxEvents: number;
  readonly maxBytes: number;
  readonly pageSize: number;
}

interface WatcherInit {
  readonly prefix: string;
  /** Deliver events with revision > start. */
  readonly start: number;
  /** History covers revisions up to here; later ones arrive through push(). */
  readonly until: number;
  readonly limits: WatcherLimits;
  readonly readHistory: (after: number, upTo: number) => StoreEvent[];
  readonly release: (watcher: SqliteWatcher) => void;
  readonly signal: AbortSignal | undefined;
}

interface Waiter {
  resolve(result: IteratorResult<StoreEvent, undefined>): void;
  reject(error: unknown): void;
}

const DONE: IteratorResult<StoreEvent, undefined> = { done: true, value: undefined };

/**
 * A single-consumer watch stream. History is pulled from the database page by page as the consumer
 * asks for it (so a long replay does not sit in memory); live events are pushed by the store into
 * a bounded queue while the replay runs or the consumer is busy.
 */
class SqliteWatcher implements Watcher, AsyncIterator<StoreEvent, undefined> {
  readonly prefix: string;
  readonly #limits: WatcherLimits;
  readonly #readHistory: (after: number, upTo: number) => StoreEvent[];
  readonly #release: (watcher: SqliteWatcher) => void;
  readonly #signal: AbortSignal | undefined;
  readonly #onAbort = (): void => this.close();
  readonly #until: number;

  #delivered: number;
  #replayDone: boolean;
  #replay: StoreEvent[] = [];
  #replayHead = 0;
  #live: StoreEvent[] = [];
  #liveHead = 0;
  #liveBytes = 0;
  #error: unknown = undefined;
  #finished = false;
  #waiters: Waiter[] = [];

  constructor(init: WatcherInit) {
    this.prefix = init.prefix;
    this.#limits = init.limits;
    this.#readHistory = init.readHistory;
    this.#release = init.release;
    this.#signal = init.signal;
    this.#until = init.until;
    this.#delivered = init.start;
    this.#replayDone = init.start >= init.until;
    if (this.#signal?.aborted) {
      this.#finished = true;
    } else {
      this.#signal?.addEventListener('abort', this.#onAbort, { once: true });
    }
  }

  get finished(): boolean {
    return this.#finished;
  }

  [Symbol.asyncIterator](): AsyncIterator<StoreEvent, undefined> {
    return this;
  }

  next(): Promise<IteratorResult<StoreEvent, undefined>> {
    return new Promise((resolve, reject) => {
      this.#waiters.push({ resolve, reject });
      this.#pump();
    });
  }

  /** Called by `break` / `return` in for-await. */
  async return(): Promise<IteratorResult<StoreEvent, undefined>> {
    this.close();
    return DONE;
  }

  close(): void {
    // An explicit close wins over an error the consumer has not read yet.
    this.#error = undefined;
    this.#finish();
    this.#pump();
  }

  /** A committed write under this watcher's prefix (called synchronously by the store). */
  push(event: StoreEvent): void {
    if (this.#finished || this.#error !== undefined) return;
    this.#live.push(event);
    this.#liveBytes += event.key.length + event.value.length;
    const queued = this.#live.length - this.#liveHead;
    if (queued > this.#limits.maxEvents || this.#liveBytes > this.#limits.maxBytes) {
      // Dropping the queue at once is the point: the memory goes now, not when the consumer
      // finally reads, and the consumer learns it must re-list.
      this.#fail(
        new StoreError(
          'Expired',
          `watcher fell too far behind (${queued} events, ${this.#liveBytes} bytes queued); re-list and watch again`,
        ),
      );
    }
    if (this.#waiters.length > 0) this.#pump();
  }

  #fail(error: unknown): void {
    this.#error = error;
    this.#dropQueues();
    this.#unsubscribe();
  }

  #finish(): void {
    this.#finished = true;
    this.#dropQueues();
    this.#unsubscribe();
  }

  #dropQueues(): void {
    this.#replay = [];
    this.#replayHead = 0;
    this.#live = [];
    this.#liveHead = 0;
    this.#liveBytes = 0;
  }

  #unsubscribe(): void {
    this.#signal?.removeEventListener('abort', this.#onAbort);
    this.#release(this);
  }

  #pump(): void {
    while (this.#waiters.length > 0) {
      let outcome: IteratorResult<StoreEvent, undefined> | { error: unknown } | undefined;
      try {
        outcome = this.#take();
      } catch (error) {
        this.#fail(error);
        continue;
      }
      if (outcome === undefined) return;
      const waiter = this.#waiters.shift();
      if (waiter === undefined) return;
      if ('error' in outcome) waiter.reject(outcome.error);
      else waiter.resolve(outcome);
    }
  }

  /** The next result for a waiting consumer, or undefined when there is nothing yet. */
  #take(): IteratorResult<StoreEvent, undefined> | { error: unknown } | undefined {
    if (this.#error !== undefined) {
      const error = this.#error;
      this.#error = undefined;
      this.#finish();
      return { error };
    }
    if (this.#finished) return DONE;
    for (;;) {
      const event = this.#replay[this.#replayHead];
      if (event !== undefined) {
        this.#replay[this.#replayHead++] = undefined as unknown as StoreEvent;
        this.#delivered = event.revision;
        return { done: false, value: event };
      }
      if (this.#replayDone) break;
      const page = this.#readHistory(this.#delivered, this.#until);
      this.#replay = page;
      this.#replayHead = 0;
      if (page.length === 0) this.#replayDone = true;
    }
    while (this.#liveHead < this.#live.length) {
      const event = this.#live[this.#liveHead] as StoreEvent;
      this.#live[this.#liveHead++] = undefined as unknown as StoreEvent;
      this.#liveBytes -= event.key.length + event.value.length;
      if (this.#liveHead > 1024 && this.#liveHead * 2 > this.#live.length) {
        this.#live = this.#live.slice(this.#liveHead);
        this.#liveHead = 0;
      }
      // Skips live events at or below a fromRevision that was ahead of the store when the watch began.
      if (event.revision <= this.#delivered) continue;
      this.#delivered = event.revision;
      return { done: false, value: event };
    }
    return undefined;
  }
}

/** Marks an exception thrown by caller code (a list filter) so it is not reported as a store failure. */
class UserCallbackError extends Error {
  override readonly cause: unknown;
  constructor(cause: unknown) {
    super('user callback failed');
    this.cause = cause;
  }
}

function callUser<A, R>(fn: (arg: A) => R, arg: A): R {
  try {
    return fn(arg);
  } catch (error) {
    throw new UserCallbackError(error);
  }
}

function toStoreError(error: unknown, message: string): StoreError {
  if (error instanceof StoreError) return error;
  const detail = error instanceof Error ? error.message : String(error);
  return new StoreError('Unavailable', `${message}: ${detail}`, { cause: error });
}

function int(value: SQLOutputValue | undefined): number {
  if (typeof value === 'number') return value;
  if (typeof value === 'bigint') return Number(value);
  throw new StoreError('Unavailable', `corrupt row: expected an integer, got ${typeof value}`);
}

function text(value: SQLOutputValue | undefined): string {
  if (typeof value === 'string') return value;
  throw new StoreError('Unavailable', `corrupt row: expected text, got ${typeof value}`);
}

function nonNegative(name: string, value: number): number {
  if (Number.isNaN(value) || value < 0) throw new RangeError(`${name} must be >= 0, got ${value}`);
  return value;
}
