/**
 * etcd v3 storage backend: the {@link Store} interface mapped onto etcd's own MVCC.
 *
 * Revisions are etcd revisions, so `resourceVersion`s handed to clients are the cluster's real
 * revisions and several kmm-preflight replicas can share one etcd: a write through one replica is a
 * watch event on every other. Writes are single-key transactions (compare create/mod revision, then
 * put or delete) exactly like kube-apiserver's etcd3 store; reads at an older revision and watches
 * from a revision are etcd's own range-at-revision and watch, and a compacted revision is `Expired`.
 *
 * Values are stored zstd-compressed behind a one-byte header (see {@link encodeValue}); a value that
 * is still over `maxValueBytes` (default 1.4 MiB, below etcd's 1.5 MiB request limit) after
 * compression is refused with `TooLarge`.
 *
 * Transport: the `etcd3` package's generated gRPC clients (on @grpc/grpc-js), one client per
 * endpoint, with the package's retry/circuit-breaker policies and watch manager bypassed: every call
 * carries a deadline of `requestTimeoutMs`, fails over to the next endpoint on a connection failure,
 * and ends as `Unavailable` naming the endpoints tried. gRPC reconnects by itself, so the store
 * recovers when etcd is back without being reopened.
 *
 * @see docs/adr/0006-etcd-storage.md
 */
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import {
  Etcd3,
  type ICallable,
  type IDuplexStream,
  type IKeyValue,
  type IOptions,
  type IRangeRequest,
  type IRangeResponse,
  type IResponseHeader,
  type IWatchRequest,
  type IWatchResponse,
} from 'etcd3';
import {
  StoreError,
  type ListOptions,
  type ListResult,
  type Store,
  type StoreEvent,
  type StoredValue,
  type Watcher,
  type WatchOptions,
} from './store.ts';

/** Client TLS for etcd (PEM files). Endpoints must then be `https://`. */
export interface EtcdTlsOptions {
  /** CA bundle that signed etcd's serving certificate; the system roots when absent. */
  readonly caFile?: string;
  /** Client certificate, for etcd's `--client-cert-auth`. */
  readonly certFile?: string;
  readonly keyFile?: string;
}

/** Options of {@link EtcdStore}. Only `endpoints` is required. */
export interface EtcdStoreOptions {
  /** Client URLs of the etcd members, e.g. `https://10.0.0.1:2379`; failover goes in this order. */
  readonly endpoints: readonly string[];
  /** Every key is stored under this prefix (default `/registry/kmm.sigs.x-k8s.io`). */
  readonly prefix?: string;
  /** Deadline of every etcd request, and the most a call waits when etcd is down (default 5,000 ms). */
  readonly requestTimeoutMs?: number;
  readonly tls?: EtcdTlsOptions;
  /** Store values zstd-compressed (default true). Compressed and plain values are both always readable. */
  readonly compression?: boolean;
  /**
   * Largest stored value (bytes after compression, default 1.4 MiB); larger writes fail with
   * `TooLarge`. etcd refuses requests over its `--max-request-bytes` (default 1.5 MiB).
   */
  readonly maxValueBytes?: number;
  /** A watcher with this many undelivered events is ended with `Expired` (default 10,000). */
  readonly watchMaxBufferedEvents?: number;
  /** Same, counted in stored (compressed) bytes of key + value (default 128 MiB). */
  readonly watchMaxBufferedBytes?: number;
  /** Keys per range request when a list must read the whole prefix or filter (default 500). */
  readonly listPageSize?: number;
}

const DEFAULT_PREFIX = '/registry/kmm.sigs.x-k8s.io';
const DEFAULT_MAX_VALUE_BYTES = Math.floor(1.4 * 1024 * 1024);

/**
 * Stored value layout. Byte 0x00 starts a zstd frame of the UTF-8 JSON; 0x01 starts plain UTF-8
 * (only used when the text itself starts with 0x00 or 0x01, which JSON never does); anything else is
 * plain UTF-8 as written by an older version or by `compression: false`, so those stay readable, and
 * stay readable by etcdctl too.
 */
const TAG_ZSTD = 0x00;
const TAG_PLAIN = 0x01;
const TAG_ZSTD_BYTE = Buffer.from([TAG_ZSTD]);
const TAG_PLAIN_BYTE = Buffer.from([TAG_PLAIN]);
/** Smaller values are stored plain: compression gains nothing there and keeps them readable in etcdctl. */
const COMPRESS_MIN_BYTES = 512;
/**
 * zstd level 3 compresses a 5.7 MB status in ~3 ms and decompresses it in ~7 ms: short, but a list
 * of such objects would add up on the event loop, so big values go through the libuv thread pool.
 */
const ASYNC_COMPRESS_BYTES = 64 * 1024;
const ASYNC_DECOMPRESS_BYTES = 8 * 1024;
/** Guard against a corrupt or hostile frame inflating without bound (V8 strings max out near 512 MiB). */
const MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024;
const ZSTD_COMPRESS: zlib.ZstdOptions = { params: { [zlib.constants.ZSTD_c_compressionLevel]: 3 } };
const ZSTD_DECOMPRESS: zlib.ZstdOptions = { maxOutputLength: MAX_DECOMPRESSED_BYTES };
const zstdCompress = promisify(zlib.zstdCompress);
const zstdDecompress = promisify(zlib.zstdDecompress);

/** Messages of etcd's gRPC errors (go.etcd.io/etcd/etcdserver/api/v3rpc/rpctypes). */
const COMPACTED = 'required revision has been compacted';
const FUTURE_REVISION = 'required revision is a future revision';
const TOO_LARGE = /request is too large|larger than max|exceeds the maximum/i;
/** The request never reached a server, so even a write may go to the next endpoint. */
const NOT_SENT = /No connection established|ECONNREFUSED|Channel closed before call started|was already closed/i;

type FaultPolicy = NonNullable<NonNullable<IOptions['faultHandling']>['global']>;
/** etcd3's retry and circuit-breaker policies replaced by a plain call: deadlines and failover are ours. */
const PASS_THROUGH = {
  execute: async (fn: (context: { signal: AbortSignal }) => unknown) => fn({ signal: new AbortController().signal }),
} as unknown as FaultPolicy;

type WatchStream = IDuplexStream<IWatchRequest, IWatchResponse>;
type GrpcMetadata = Parameters<Parameters<ICallable<unknown>['withConnection']>[1]>[0]['metadata'];
interface WatchRpc {
  watch(metadata: GrpcMetadata, options: object): WatchStream;
}

/** One etcd endpoint with its own client (gRPC channel). */
interface Member {
  readonly endpoint: string;
  readonly client: Etcd3;
  /** The client's connection pool, for opening watch streams with our own metadata. */
  readonly pool: ICallable<unknown>;
}

interface CallOptions {
  readonly deadline: number;
}

/** etcd said the revision asked for is above its current one. */
class FutureRevisionError extends Error {}

/**
 * {@link Store} on an etcd v3 cluster. Open it with {@link openEtcdStore}.
 *
 * Keys given by callers must start with `/`; they are stored as `prefix + key`. List and watch
 * prefixes are `''` (everything under the store prefix) or start with `/`.
 */
export class EtcdStore implements Store {
  readonly name = 'etcd';
  /** Key prefix in etcd, without a trailing slash. */
  readonly prefix: string;
  readonly endpoints: readonly string[];

  readonly #members: readonly Member[];
  readonly #timeoutMs: number;
  readonly #compression: boolean;
  readonly #maxValueBytes: number;
  readonly #listPageSize: number;
  readonly #watchLimits: WatchLimits;
  readonly #watchers = new Set<EtcdWatcher>();

  /** Member tried first: the last one that answered. */
  #preferred = 0;
  /** Highest revision seen in any response: "now" for watches from revision 0. */
  #revision = 0;
  /** Revisions below this are known to be compacted (a lower bound; etcd may have compacted further). */
  #compacted = 0;
  #closed = false;

  /** Use {@link openEtcdStore}, which also checks that etcd answers. */
  constructor(options: EtcdStoreOptions, credentials?: IOptions['credentials']) {
    if (options.endpoints.length === 0) throw new RangeError('etcd store needs at least one endpoint');
    this.prefix = (options.prefix ?? DEFAULT_PREFIX).replace(/\/+$/, '');
    this.#timeoutMs = positive('requestTimeoutMs', options.requestTimeoutMs ?? 5_000);
    this.#compression = options.compression ?? true;
    this.#maxValueBytes = positive('maxValueBytes', options.maxValueBytes ?? DEFAULT_MAX_VALUE_BYTES);
    this.#listPageSize = Math.floor(positive('listPageSize', options.listPageSize ?? 500));
    this.#watchLimits = {
      maxEvents: positive('watchMaxBufferedEvents', options.watchMaxBufferedEvents ?? 10_000),
      maxBytes: positive('watchMaxBufferedBytes', options.watchMaxBufferedBytes ?? 128 * 1024 * 1024),
      createTimeoutMs: this.#timeoutMs,
    };
    const tls = credentials !== undefined;
    this.endpoints = options.endpoints.map((e) => normalizeEndpoint(e, tls));
    const grpcOptions = {
      // Lists of large objects exceed gRPC's default 4 MiB; etcd itself bounds what it sends.
      'grpc.max_receive_message_length': -1,
      // Detects a member that stopped answering under an open watch. etcd's default
      // --grpc-keepalive-min-time is 5 s; pinging more often gets the connection closed.
      'grpc.keepalive_time_ms': 15_000,
      'grpc.keepalive_timeout_ms': Math.max(1_000, this.#timeoutMs),
      // gRPC's default reconnect backoff grows to 120 s; a store must notice etcd is back sooner.
      'grpc.initial_reconnect_backoff_ms': 250,
      'grpc.max_reconnect_backoff_ms': 2_000,
    };
    this.#members = this.endpoints.map((endpoint) => {
      const client = new Etcd3({
        hosts: endpoint,
        ...(credentials ? { credentials } : {}),
        grpcOptions,
        faultHandling: { host: () => PASS_THROUGH, global: PASS_THROUGH },
      });
      return { endpoint, client, pool: (client as unknown as { pool: ICallable<unknown> }).pool };
    });
  }

  /** Number of open watchers (for metrics and tests). */
  get activeWatchers(): number {
    return this.#watchers.size;
  }

  async get(key: string): Promise<StoredValue | undefined> {
    const k = this.#key(key);
    const res = await this.#call(false, (m, o) => m.client.kv.range({ key: k }, o));
    const kv = res.kvs[0];
    if (kv === undefined) return undefined;
    return { key, value: await this.#decode(kv), modRevision: Number(kv.mod_revision) };
  }

  /**
   * Keys under `prefix` in byte order of their UTF-8 (JavaScript order for ASCII), read with etcd
   * ranges of at most `listPageSize` keys, all at one revision. `atRevision` above the current
   * revision reads the current state; below the compacted revision it rejects with `Expired`.
   */
  async list(prefix: string, options: ListOptions = {}): Promise<ListResult> {
    const { startAfter, limit = 0, filter } = options;
    const { key: lower, end } = this.#range(prefix);
    let start = lower;
    if (startAfter !== undefined) {
      // The smallest key strictly greater than startAfter is startAfter + "\0".
      const after = Buffer.concat([Buffer.from(this.prefix + startAfter), Buffer.from([0])]);
      if (Buffer.compare(after, start) > 0) start = after;
    }
    let revision = options.atRevision !== undefined && options.atRevision > 0 ? options.atRevision : 0;
    const items: StoredValue[] = [];
    const singlePage = filter === undefined && limit > 0;
    for (;;) {
      const res = await this.#rangeAt({
        key: start,
        range_end: end,
        limit: singlePage ? limit : this.#listPageSize,
        revision,
      });
      if (revision === 0 || revision > Number(res.header.revision)) revision = Number(res.header.revision);
      const values = await Promise.all(res.kvs.map((kv) => this.#decode(kv)));
      for (const [i, kv] of res.kvs.entries()) {
        const item: StoredValue = {
          key: kv.key.toString('utf8').slice(this.prefix.length),
          value: values[i] as string,
          modRevision: Number(kv.mod_revision),
        };
        if (filter !== undefined && !filter(item)) continue;
        if (limit > 0 && items.length >= limit) return { items, revision, more: true };
        items.push(item);
      }
      const last = res.kvs.at(-1);
      if (singlePage || !res.more || last === undefined) return { items, revision, more: singlePage && res.more };
      start = Buffer.concat([last.key, Buffer.from([0])]);
    }
  }

  async create(key: string, value: string): Promise<StoredValue> {
    const k = this.#key(key);
    const bytes = await this.#encode(key, value);
    const res = await this.#call(true, (m, o) =>
      m.client.kv.txn(
        {
          compare: [{ key: k, target: 'Create', result: 'Equal', create_revision: 0 }],
          success: [{ request_put: { key: k, value: bytes } }],
          failure: [],
        },
        o,
      ),
    );
    if (!res.succeeded) throw new StoreError('AlreadyExists', `${key} already exists`);
    return { key, value, modRevision: Number(res.header.revision) };
  }

  async update(key: string, value: string, expectedRevision: number): Promise<StoredValue> {
    const k = this.#key(key);
    const bytes = await this.#encode(key, value);
    const res = await this.#call(true, (m, o) =>
      m.client.kv.txn(
        {
          compare: [
            { key: k, target: 'Create', result: 'Greater', create_revision: 0 },
            { key: k, target: 'Mod', result: 'Equal', mod_revision: expectedRevision },
          ],
          success: [{ request_put: { key: k, value: bytes } }],
          failure: [{ request_range: { key: k, keys_only: true } }],
        },
        o,
      ),
    );
    if (!res.succeeded) throw this.#casFailure(key, res.responses[0]?.response_range, expectedRevision);
    return { key, value, modRevision: Number(res.header.revision) };
  }

  async delete(key: string, expectedRevision?: number): Promise<StoredValue> {
    const k = this.#key(key);
    const res = await this.#call(true, (m, o) =>
      m.client.kv.txn(
        {
          compare: [
            { key: k, target: 'Create', result: 'Greater', create_revision: 0 },
            ...(expectedRevision === undefined
              ? []
              : [{ key: k, target: 'Mod' as const, result: 'Equal' as const, mod_revision: expectedRevision }]),
          ],
          success: [{ request_delete_range: { key: k, prev_kv: true } }],
          failure: [{ request_range: { key: k, keys_only: true } }],
        },
        o,
      ),
    );
    if (!res.succeeded) throw this.#casFailure(key, res.responses[0]?.response_range, expectedRevision);
    const prev = res.responses[0]?.response_delete_range?.prev_kvs[0];
    if (prev === undefined) throw new StoreError('Unavailable', `etcd deleted ${key} but returned no previous value`);
    return { key, value: await this.#decode(prev), modRevision: Number(res.header.revision) };
  }

  /**
   * An etcd watch from `fromRevision + 1` (from now when 0) on its own gRPC stream, with the
   * previous value of deleted keys. Throws `Expired` at once when `fromRevision` is below the
   * compacted revision this store knows of; a compaction it did not know of ends the iteration with
   * `Expired` instead. A broken stream (etcd down, member lost the leader) ends it with
   * `Unavailable`: watch again.
   */
  watch(prefix: string, options: WatchOptions): Watcher {
    if (this.#closed) throw new StoreError('Unavailable', 'store is closed');
    const from = options.fromRevision;
    if (!Number.isSafeInteger(from) || from < 0) throw new RangeError(`fromRevision must be an integer >= 0, got ${from}`);
    const range = this.#range(prefix);
    if (from > 0 && from < this.#compacted) throw this.#expired(from);
    const member = this.#members[this.#preferred] as Member;
    const watcher = new EtcdWatcher({
      ...range,
      from,
      // "From now" is after everything this process has seen, so a write acknowledged to this
      // process after watch() returned is always delivered, as with the SQLite store.
      now: this.#revision,
      prefixLength: this.prefix.length,
      endpoint: member.endpoint,
      limits: this.#watchLimits,
      signal: options.signal,
      open: () => this.#openWatchStream(member),
      decode: (kv) => this.#decode(kv),
      observe: (header) => this.#observe(header),
      compacted: (revision) => {
        this.#compacted = Math.max(this.#compacted, revision);
        return this.#expired(from);
      },
      broken: () => this.#demote(member),
      release: (w) => this.#watchers.delete(w),
    });
    if (!watcher.finished) this.#watchers.add(watcher);
    return watcher;
  }

  /** The cluster's current revision (a linearizable read, so it checks quorum too). */
  async currentRevision(): Promise<number> {
    const key = Buffer.from(this.prefix);
    const res = await this.#call(false, (m, o) => m.client.kv.range({ key, count_only: true }, o));
    return Number(res.header.revision);
  }

  /**
   * The revision etcd is compacted to: the oldest revision a read or watch can still start from
   * (0 when nothing was compacted). etcd has no API for it, so it is found by a binary search with
   * count-only ranges above the last known value (about log2(revision) cheap requests).
   */
  async compactedRevision(): Promise<number> {
    const current = await this.currentRevision();
    const key = Buffer.from(this.prefix);
    const readable = async (revision: number): Promise<boolean> => {
      try {
        await this.#call(false, (m, o) => m.client.kv.range({ key, count_only: true, revision }, o));
        return true;
      } catch (error) {
        if (error instanceof StoreError && error.code === 'Expired') return false;
        throw error;
      }
    };
    let lo = Math.min(Math.max(this.#compacted, 1), current);
    if (await readable(lo)) return this.#compacted;
    let hi = current; // the current revision is always readable
    while (hi - lo > 1) {
      const mid = Math.floor((lo + hi) / 2);
      if (await readable(mid)) hi = mid;
      else lo = mid;
    }
    this.#compacted = Math.max(this.#compacted, hi);
    return this.#compacted;
  }

  /**
   * Compacts etcd's history up to `revision` (for the whole cluster, not just this prefix) and waits
   * until it is applied. In production kube-apiserver or etcd's auto-compaction do this; tests and
   * tools call it. Returns the compacted revision; compacting below it is a no-op.
   */
  async compact(revision: number): Promise<number> {
    if (!Number.isSafeInteger(revision) || revision < 1) throw new RangeError(`cannot compact to revision ${revision}`);
    try {
      await this.#call(false, (m, o) => m.client.kv.compact({ revision, physical: true }, o));
      this.#compacted = Math.max(this.#compacted, revision);
      return this.#compacted;
    } catch (error) {
      if (error instanceof FutureRevisionError) {
        throw new RangeError(`cannot compact to revision ${revision}: current revision is ${await this.currentRevision()}`);
      }
      if (error instanceof StoreError && error.code === 'Expired') return this.compactedRevision();
      throw error;
    }
  }

  /** Throws `Unavailable` when no member can serve a linearizable read within the timeout. */
  async ping(): Promise<void> {
    await this.currentRevision();
  }

  /** Ends all watchers and closes the gRPC channels. Later calls reject with `Unavailable`. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const watcher of [...this.#watchers]) watcher.close();
    this.#watchers.clear();
    for (const member of this.#members) member.client.close();
  }

  /**
   * Runs one etcd request with a deadline, on the preferred member first and on the next ones when a
   * member is unreachable, all within one `requestTimeoutMs`. A write moves on only when it provably
   * never reached a server, so a transaction is never applied twice.
   */
  async #call<T extends { header: IResponseHeader }>(
    write: boolean,
    fn: (member: Member, options: CallOptions) => Promise<T>,
  ): Promise<T> {
    if (this.#closed) throw new StoreError('Unavailable', 'store is closed');
    const deadline = Date.now() + this.#timeoutMs;
    const failures: string[] = [];
    let last: StoreError | undefined;
    const first = this.#preferred;
    for (let attempt = 0; attempt < this.#members.length; attempt++) {
      const index = (first + attempt) % this.#members.length;
      const member = this.#members[index] as Member;
      try {
        const res = await fn(member, { deadline });
        this.#preferred = index;
        this.#observe(res.header);
        return res;
      } catch (error) {
        if (this.#closed) throw new StoreError('Unavailable', 'store is closed', { cause: error });
        const message = errorMessage(error);
        if (message.includes(COMPACTED)) throw new StoreError('Expired', `etcd: ${message}`, { cause: error });
        if (message.includes(FUTURE_REVISION)) throw new FutureRevisionError(message, { cause: error });
        if (TOO_LARGE.test(message)) throw new StoreError('TooLarge', `etcd refused the request: ${message}`, { cause: error });
        const timedOut = /DEADLINE_EXCEEDED/.test(message) || Date.now() >= deadline;
        failures.push(
          timedOut
            ? `${member.endpoint} did not answer within ${this.#timeoutMs} ms`
            : `${member.endpoint}: ${message}`,
        );
        last = new StoreError('Unavailable', `etcd is unavailable (${failures.join('; ')})`, { cause: error });
        this.#demote(member);
        if (timedOut || (write && !NOT_SENT.test(message))) break;
      }
    }
    throw last ?? new StoreError('Unavailable', 'etcd is unavailable');
  }

  /** A range at `revision` (0: now); a revision above the current one reads the current state. */
  async #rangeAt(req: IRangeRequest): Promise<IRangeResponse> {
    try {
      return await this.#call(false, (m, o) => m.client.kv.range(req, o));
    } catch (error) {
      if (error instanceof FutureRevisionError) return this.#call(false, (m, o) => m.client.kv.range({ ...req, revision: 0 }, o));
      if (error instanceof StoreError && error.code === 'Expired') {
        const revision = Number(req.revision ?? 0);
        this.#compacted = Math.max(this.#compacted, revision + 1);
        throw this.#expired(revision);
      }
      throw error;
    }
  }

  /** A member that failed is tried last from now on. */
  #demote(member: Member): void {
    const index = this.#members.indexOf(member);
    if (index === this.#preferred) this.#preferred = (index + 1) % this.#members.length;
  }

  #observe(header: IResponseHeader | undefined): void {
    const revision = Number(header?.revision ?? 0);
    if (revision > this.#revision) this.#revision = revision;
  }

  #expired(revision: number): StoreError {
    return new StoreError(
      'Expired',
      `revision ${revision} has been compacted (oldest available: ${this.#compacted} or later)`,
    );
  }

  #casFailure(key: string, current: IRangeResponse | undefined, expected: number | undefined): StoreError {
    const kv = current?.kvs[0];
    if (kv === undefined) return new StoreError('NotFound', `${key} not found`);
    return new StoreError('Conflict', `${key} is at revision ${kv.mod_revision}, not ${expected}`);
  }

  #key(key: string): Buffer {
    if (!key.startsWith('/')) throw new RangeError(`keys must start with "/", got ${JSON.stringify(key)}`);
    return Buffer.from(this.prefix + key);
  }

  /** The etcd key range of a list or watch prefix. */
  #range(prefix: string): { key: Buffer; end: Buffer } {
    if (prefix !== '' && !prefix.startsWith('/')) {
      throw new RangeError(`a prefix must be empty or start with "/", got ${JSON.stringify(prefix)}`);
    }
    const key = Buffer.from(this.prefix + (prefix === '' ? '/' : prefix));
    return { key, end: prefixEnd(key) };
  }

  async #encode(key: string, value: string): Promise<Buffer> {
    const { bytes, raw } = await encodeValue(value, this.#compression);
    if (bytes.length > this.#maxValueBytes) {
      const packed = bytes.length === raw ? '' : `, ${bytes.length} bytes after zstd compression`;
      throw new StoreError(
        'TooLarge',
        `value of ${key} is ${raw} bytes${packed}: over the ${this.#maxValueBytes}-byte limit of the etcd ` +
          `backend (etcd refuses requests over 1.5 MiB)`,
      );
    }
    return bytes;
  }

  async #decode(kv: IKeyValue): Promise<string> {
    try {
      return await decodeValue(kv.value);
    } catch (error) {
      throw new StoreError('Unavailable', `cannot decode the value of ${kv.key.toString()}: ${errorMessage(error)}`, {
        cause: error,
      });
    }
  }

  /** A bidirectional watch stream that asks the member to cancel it when it loses the raft leader. */
  #openWatchStream(member: Member): Promise<WatchStream> {
    if (this.#closed) return Promise.reject(new StoreError('Unavailable', 'store is closed'));
    return member.pool.withConnection('Watch', ({ client, metadata }) => {
      const md = metadata.clone();
      // clientv3.WithRequireLeader: a partitioned member cancels the watch instead of going silent.
      md.set('hasleader', 'true');
      return (client as unknown as WatchRpc).watch(md, {});
    });
  }
}

/**
 * Opens an {@link EtcdStore} and checks that etcd answers; rejects with {@link StoreError}
 * `Unavailable` (naming the endpoints) when it does not, or when a TLS file cannot be read.
 */
export async function openEtcdStore(options: EtcdStoreOptions): Promise<EtcdStore> {
  let credentials: IOptions['credentials'];
  if (options.tls !== undefined) {
    const read = async (path: string | undefined) => {
      if (path === undefined) return undefined;
      try {
        return await readFile(path);
      } catch (error) {
        throw new StoreError('Unavailable', `cannot read etcd TLS file ${path}: ${errorMessage(error)}`, { cause: error });
      }
    };
    const [ca, cert, key] = await Promise.all([read(options.tls.caFile), read(options.tls.certFile), read(options.tls.keyFile)]);
    if ((cert === undefined) !== (key === undefined)) {
      throw new RangeError('etcd tls.certFile and tls.keyFile must be given together');
    }
    // grpc-js takes null for "system roots"; etcd3's type asks for a Buffer.
    credentials = { rootCertificate: (ca ?? null) as Buffer, ...(key ? { privateKey: key } : {}), ...(cert ? { certChain: cert } : {}) };
  }
  const store = new EtcdStore(options, credentials);
  try {
    await store.ping();
  } catch (error) {
    await store.close();
    throw error;
  }
  return store;
}

/** The stored bytes of a value (see {@link TAG_ZSTD}) and its UTF-8 length. */
export async function encodeValue(value: string, compress: boolean): Promise<{ bytes: Buffer; raw: number }> {
  const raw = Buffer.from(value, 'utf8');
  if (compress && raw.length >= COMPRESS_MIN_BYTES) {
    const packed = raw.length >= ASYNC_COMPRESS_BYTES ? await zstdCompress(raw, ZSTD_COMPRESS) : zlib.zstdCompressSync(raw, ZSTD_COMPRESS);
    if (packed.length + 1 < raw.length) return { bytes: Buffer.concat([TAG_ZSTD_BYTE, packed]), raw: raw.length };
  }
  const first = raw[0];
  if (first === TAG_ZSTD || first === TAG_PLAIN) return { bytes: Buffer.concat([TAG_PLAIN_BYTE, raw]), raw: raw.length };
  return { bytes: raw, raw: raw.length };
}

/** The value text of stored bytes, compressed or not. */
export async function decodeValue(bytes: Buffer): Promise<string> {
  const tag = bytes[0];
  if (tag === TAG_ZSTD) {
    const body = bytes.subarray(1);
    const text = body.length >= ASYNC_DECOMPRESS_BYTES ? await zstdDecompress(body, ZSTD_DECOMPRESS) : zlib.zstdDecompressSync(body, ZSTD_DECOMPRESS);
    return text.toString('utf8');
  }
  if (tag === TAG_PLAIN) return bytes.toString('utf8', 1);
  return bytes.toString('utf8');
}

/** The smallest key greater than every key starting with `key` (etcd's `range_end` for a prefix). */
function prefixEnd(key: Buffer): Buffer {
  const end = Buffer.from(key);
  for (let i = end.length - 1; i >= 0; i--) {
    if ((end[i] as number) < 0xff) {
      end[i] = (end[i] as number) + 1;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]); // all 0xff: to the end of the keyspace
}

function normalizeEndpoint(endpoint: string, tls: boolean): string {
  const trimmed = endpoint.trim().replace(/\/+$/, '');
  if (/^https?:\/\//.test(trimmed)) return trimmed;
  return `${tls ? 'https' : 'http'}://${trimmed}`;
}

function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function positive(name: string, value: number): number {
  if (Number.isNaN(value) || value <= 0) throw new RangeError(`${name} must be > 0, got ${value}`);
  return value;
}

interface WatchLimits {
  readonly maxEvents: number;
  readonly maxBytes: number;
  /** A watch that etcd has not confirmed within this time ends with `Unavailable`. */
  readonly createTimeoutMs: number;
}

interface WatcherInit {
  readonly key: Buffer;
  readonly end: Buffer;
  /** Deliver events after this revision; 0 means from now. */
  readonly from: number;
  /** The store's latest known revision, the start of a watch from now. */
  readonly now: number;
  readonly prefixLength: number;
  readonly endpoint: string;
  readonly limits: WatchLimits;
  readonly signal: AbortSignal | undefined;
  readonly open: () => Promise<WatchStream>;
  readonly decode: (kv: IKeyValue) => Promise<string>;
  readonly observe: (header: IResponseHeader) => void;
  /** etcd reported history compacted up to `revision`; returns the error to end with. */
  readonly compacted: (revision: number) => StoreError;
  /** The stream broke: the store tries another member first next time. */
  readonly broken: () => void;
  readonly release: (watcher: EtcdWatcher) => void;
}

/** An event as received, decoded only when the consumer takes it (so the queue holds compressed bytes). */
interface RawEvent {
  readonly type: StoreEvent['type'];
  readonly key: string;
  readonly kv: IKeyValue;
  readonly revision: number;
  readonly bytes: number;
}

interface Waiter {
  resolve(result: IteratorResult<StoreEvent, undefined>): void;
  reject(error: unknown): void;
}

const DONE: IteratorResult<StoreEvent, undefined> = { done: true, value: undefined };

/**
 * A single-consumer iterator over one etcd watch stream. Responses are queued as they arrive (gRPC
 * keeps reading), bounded by {@link WatchLimits}: a consumer that falls that far behind is ended
 * with `Expired`, as kube-apiserver does with a slow watcher. The replay of history is pushed by
 * etcd like live events, so it counts against the same bounds.
 */
class EtcdWatcher implements Watcher, AsyncIterator<StoreEvent, undefined> {
  readonly #init: WatcherInit;
  readonly #onAbort = (): void => this.close();
  #stream: WatchStream | undefined;
  #timer: NodeJS.Timeout | undefined;
  #overflowCheck: NodeJS.Immediate | undefined;
  #created = false;
  #retriedFromNow = false;

  #queue: RawEvent[] = [];
  #head = 0;
  #bytes = 0;
  /** Delivered after the queued events (or at once when the queue was dropped). */
  #error: StoreError | undefined;
  #finished = false;
  #released = false;
  #waiters: Waiter[] = [];
  #pumping = false;

  constructor(init: WatcherInit) {
    this.#init = init;
    if (init.signal?.aborted) {
      this.#finished = true;
      this.#released = true;
      return;
    }
    init.signal?.addEventListener('abort', this.#onAbort, { once: true });
    this.#timer = setTimeout(() => {
      if (!this.#created) {
        init.broken();
        this.#fail(
          new StoreError('Unavailable', `etcd at ${init.endpoint} did not start the watch within ${init.limits.createTimeoutMs} ms`),
          false,
        );
      }
    }, init.limits.createTimeoutMs);
    this.#timer.unref();
    init.open().then(
      (stream) => this.#attach(stream),
      (error: unknown) => {
        init.broken();
        this.#fail(unavailable(init.endpoint, error), false);
      },
    );
  }

  get finished(): boolean {
    return this.#finished || this.#error !== undefined;
  }

  [Symbol.asyncIterator](): AsyncIterator<StoreEvent, undefined> {
    return this;
  }

  next(): Promise<IteratorResult<StoreEvent, undefined>> {
    return new Promise((resolve, reject) => {
      this.#waiters.push({ resolve, reject });
      void this.#pump();
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
    this.#finished = true;
    this.#dropQueue();
    this.#release();
    void this.#pump();
  }

  #attach(stream: WatchStream): void {
    // Listeners first: an 'error' without a listener would crash the process.
    // Our own cancel() ends the stream with an error too: only a stream still in use is "broken".
    stream.on('error', (error: Error) => {
      if (this.#released) return;
      this.#init.broken();
      this.#fail(unavailable(this.#init.endpoint, error, 'the watch stream broke'), false);
    });
    stream.on('end', () => {
      if (!this.#released) this.#fail(new StoreError('Unavailable', `etcd at ${this.#init.endpoint} ended the watch stream`), false);
    });
    stream.on('data', (res: IWatchResponse) => this.#receive(res));
    this.#stream = stream;
    if (this.finished) {
      stream.cancel();
      return;
    }
    this.#create(this.#init.from > 0 ? this.#init.from + 1 : this.#init.now > 0 ? this.#init.now + 1 : 0);
  }

  #create(startRevision: number): void {
    this.#stream?.write({
      create_request: {
        key: this.#init.key,
        range_end: this.#init.end,
        start_revision: startRevision,
        prev_kv: true,
      },
    });
  }

  #receive(res: IWatchResponse): void {
    if (this.finished) return;
    this.#init.observe(res.header);
    if (res.created) this.#created = true;
    if (res.canceled) {
      const compactedTo = Number(res.compact_revision);
      if (compactedTo > 0 && this.#init.from === 0 && !this.#retriedFromNow) {
        // "From now" started at a revision this process saw before a compaction: start at etcd's now.
        this.#retriedFromNow = true;
        this.#create(0);
        return;
      }
      if (compactedTo > 0) this.#fail(this.#init.compacted(compactedTo), false);
      else this.#fail(new StoreError('Unavailable', `etcd at ${this.#init.endpoint} canceled the watch: ${res.cancel_reason || 'no reason given'}`), false);
      return;
    }
    for (const event of res.events) {
      const kv = event.kv;
      const revision = Number(kv.mod_revision);
      let type: StoreEvent['type'];
      let source: IKeyValue;
      if (event.type === 'Delete') {
        if (!event.prev_kv) {
          // The previous value was compacted before etcd could attach it; the client must re-list.
          this.#fail(this.#init.compacted(revision), false);
          return;
        }
        type = 'DELETED';
        source = event.prev_kv;
      } else {
        type = kv.create_revision === kv.mod_revision ? 'ADDED' : 'MODIFIED';
        source = kv;
      }
      const key = kv.key.toString('utf8').slice(this.#init.prefixLength);
      const bytes = kv.key.length + source.value.length;
      this.#queue.push({ type, key, kv: source, revision, bytes });
      this.#bytes += bytes;
    }
    if (this.#waiters.length > 0) void this.#pump();
    if (this.#overLimits() && this.#overflowCheck === undefined) {
      // gRPC hands over every message of a socket read in one go, so a consumer that keeps up can
      // still see a burst over the limit. It gets until the next turn of the event loop (a waiting
      // consumer drains in microtasks) before it counts as slow.
      this.#overflowCheck = setImmediate(() => {
        this.#overflowCheck = undefined;
        if (this.finished || !this.#overLimits()) return;
        // Dropping the queue at once is the point: the memory goes now, not when the consumer reads.
        const queued = this.#queue.length - this.#head;
        this.#fail(
          new StoreError('Expired', `watcher fell too far behind (${queued} events, ${this.#bytes} bytes queued); re-list and watch again`),
          true,
        );
      });
    }
  }

  #overLimits(): boolean {
    return this.#queue.length - this.#head > this.#init.limits.maxEvents || this.#bytes > this.#init.limits.maxBytes;
  }

  /** Ends the watch with `error`, after the queued events unless `drop`. */
  #fail(error: StoreError, drop: boolean): void {
    if (this.finished) return;
    this.#error = error;
    if (drop) this.#dropQueue();
    this.#release();
    void this.#pump();
  }

  #dropQueue(): void {
    this.#queue = [];
    this.#head = 0;
    this.#bytes = 0;
  }

  /** Frees the gRPC stream and unsubscribes; the consumer may still read what is queued. */
  #release(): void {
    if (this.#released) return;
    this.#released = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    if (this.#overflowCheck !== undefined) clearImmediate(this.#overflowCheck);
    this.#init.signal?.removeEventListener('abort', this.#onAbort);
    // Cancel rather than end: end() only half-closes, and etcd keeps the stream open until it is cancelled.
    this.#stream?.cancel();
    this.#init.release(this);
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#waiters.length > 0) {
        const raw = this.#head < this.#queue.length ? this.#queue[this.#head] : undefined;
        if (raw !== undefined) {
          this.#queue[this.#head++] = undefined as unknown as RawEvent;
          this.#bytes -= raw.bytes;
          if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
            this.#queue = this.#queue.slice(this.#head);
            this.#head = 0;
          }
          let value: string;
          try {
            value = await this.#init.decode(raw.kv);
          } catch (error) {
            this.#fail(error instanceof StoreError ? error : unavailable(this.#init.endpoint, error), true);
            continue;
          }
          if (this.#finished) continue; // closed while decoding
          this.#waiters.shift()?.resolve({ done: false, value: { type: raw.type, key: raw.key, value, revision: raw.revision } });
          continue;
        }
        if (this.#error !== undefined) {
          const error = this.#error;
          this.#error = undefined;
          this.#finished = true;
          this.#waiters.shift()?.reject(error);
          continue;
        }
        if (this.#finished) {
          this.#waiters.shift()?.resolve(DONE);
          continue;
        }
        return;
      }
    } finally {
      this.#pumping = false;
    }
  }
}

function unavailable(endpoint: string, error: unknown, what = 'cannot watch'): StoreError {
  if (error instanceof StoreError) return error;
  return new StoreError('Unavailable', `etcd at ${endpoint}: ${what}: ${errorMessage(error)}`, { cause: error });
}
