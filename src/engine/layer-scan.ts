/**
 * One pass over one image layer blob (compressed as stored), recording what the Image stage needs
 * to decide about any module, any kernel and any `dirName`: the result depends on the layer's
 * bytes only, so it is cached by layer digest (docs/adr/0008-image-stage.md).
 *
 * Streaming with bounded memory: the blob is decompressed (gzip or zstd, by magic bytes) and read
 * by tar-stream; only kernel module files (`*.ko`, `*.ko.xz|zst|gz`) and `modules.dep` files are
 * buffered, one at a time and each up to a cap; everything else is drained. Recorded:
 *
 * - every entry under any `…/lib/modules/…` tree, with its type, size and link target;
 * - every symlink (any of them may be a directory on the way to a module: merged /usr);
 * - every whiteout (`.wh.<name>`) and opaque directory (`.wh..wh..opq`);
 * - directories and other non-files near the root (depth ≤ 3 for directories, ≤ 2 for files) and
 *   anything named `lib` or `modules`: an upper layer's entry there can hide a lower tree;
 * - for each module file its `.modinfo` (vermagic, name, depends, ...), and each `modules.dep`
 *   parsed.
 *
 * A layer with an entry whose path has a `..` component (or a hard link to one) is refused, as is
 * one that decompresses to more than `maxUncompressedBytes` (a decompression bomb) or that is not a
 * valid (compressed) tar. A refused layer is still read to its end, without decompressing, so that
 * the registry client verifies its digest before the refusal is cached.
 */
import { detectCompression, type LayerCompression } from './decompress.ts';
import type { Readable } from 'node:stream';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { extract as tarExtract, type Extract } from 'tar-stream';
import {
  formatBytes,
  isModuleFileName,
  ModinfoError,
  parseModulesDep,
  readModuleInfo,
  type ModuleInfo,
  type ModulesDep,
} from './modinfo.ts';

/** A tar entry: its header and a stream of its content. */
type Entry = Extract extends AsyncIterable<infer S> ? S : never;

/** Bump when the result format or what is recorded changes: older cached scans are then ignored. */
export const LAYER_SCAN_VERSION = 1;

export interface LayerScanLimits {
  /** Decompressed bytes of the whole layer (default 8 GiB): more is refused as a decompression bomb. */
  readonly maxUncompressedBytes: number;
  /** Size of one module or modules.dep file, compressed and decompressed (default 64 MiB). */
  readonly maxCandidateBytes: number;
  /** Tar entries in a layer (default 5,000,000). */
  readonly maxEntries: number;
  /** Entries recorded in the result (default 1,000,000): bounds the size of a cached scan. */
  readonly maxRecordedEntries: number;
  /** zstd window (log2), default 27 (128 MiB, the zstd default limit; `--long` frames need it). */
  readonly zstdWindowLogMax: number;
}

export const DEFAULT_LAYER_SCAN_LIMITS: LayerScanLimits = {
  maxUncompressedBytes: 8 * 1024 ** 3,
  maxCandidateBytes: 64 * 1024 ** 2,
  maxEntries: 5_000_000,
  maxRecordedEntries: 1_000_000,
  zstdWindowLogMax: 27,
};


interface FileFacts {
  /** Module information of a module file. */
  readonly module?: ModuleInfo;
  /** Parsed content of a `modules.dep` file. */
  readonly modulesDep?: ModulesDep;
  /** Why a module or modules.dep file could not be read (not ELF, too large, ...). */
  readonly error?: string;
  /** Set when `error` is due to `maxCandidateBytes`: the limit then in force. */
  readonly errorLimit?: number;
}

export interface LayerFileEntry extends FileFacts {
  readonly type: 'file';
  readonly size: number;
  /** For a hard link resolved inside this layer: the path it links to. */
  readonly linkOf?: string;
}
export interface LayerDirEntry {
  readonly type: 'dir';
}
export interface LayerSymlinkEntry {
  readonly type: 'symlink';
  /** The link target as written (relative, or absolute meaning from the image root). */
  readonly target: string;
}
/** A hard link whose target is not a file of this layer (resolved against lower layers). */
export interface LayerHardlinkEntry {
  readonly type: 'hardlink';
  /** Normalised path of the target, from the image root. */
  readonly target: string;
}
/** Devices, fifos. */
export interface LayerOtherEntry {
  readonly type: 'other';
}
export type LayerEntry = LayerFileEntry | LayerDirEntry | LayerSymlinkEntry | LayerHardlinkEntry | LayerOtherEntry;

export type LayerRefusalCode = 'PathEscape' | 'DecompressionLimit' | 'TooManyEntries' | 'InvalidArchive';

export interface LayerRefusal {
  readonly code: LayerRefusalCode;
  /** A sentence naming the layer, e.g. `layer sha256:… has a path that leaves the root: ../x`. */
  readonly reason: string;
}

/**
 * What one layer holds that matters to the Image stage. JSON-serialisable; depends on the layer's
 * content (and, for refusals, on the limits recorded in `limits`) only.
 */
export interface LayerScanResult {
  readonly version: number;
  readonly digest: string;
  readonly compression: LayerCompression;
  readonly compressedBytes: number;
  readonly uncompressedBytes: number;
  /** All tar entries seen (recorded or not). */
  readonly entryCount: number;
  readonly limits: LayerScanLimits;
  readonly refused?: LayerRefusal;
  /** Recorded entries by normalised path (no leading `/`, e.g. `opt/lib/modules/6.1.0/extra/gpu.ko`). */
  readonly entries: Readonly<Record<string, LayerEntry>>;
  /** Paths deleted from lower layers by a `.wh.<name>` whiteout. */
  readonly whiteouts: readonly string[];
  /** Directories whose lower-layer content is hidden (`.wh..wh..opq`); `''` is the root. */
  readonly opaqueDirs: readonly string[];
}

export interface ScanLayerOptions {
  readonly digest: string;
  readonly limits?: Partial<LayerScanLimits>;
  readonly signal?: AbortSignal;
}

/** The entry path escapes the root (`..`); carries the offending name. */
class PathEscapeError extends Error {}

/**
 * Normalises a tar entry name: no leading `/` or `./`, no `.` components, no duplicate or trailing
 * slashes. Returns undefined for a path with a `..` component.
 */
export function normalizeEntryPath(name: string): string | undefined {
  const out: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') return undefined;
    out.push(part);
  }
  return out.join('/');
}


const MODULES_TREE_RE = /(?:^|\/)lib\/modules(?:\/|$)/;

/** Whether a non-module, non-symlink entry is worth recording (see the file comment). */
function isStructural(path: string, type: LayerEntry['type']): boolean {
  if (MODULES_TREE_RE.test(path)) return true;
  const base = path.slice(path.lastIndexOf('/') + 1);
  if (base === 'lib' || base === 'modules' || base === 'modules.dep') return true;
  let depth = 1;
  for (let i = 0; i < path.length; i++) if (path.charCodeAt(i) === 47) depth++;
  return depth <= (type === 'dir' ? 3 : 2);
}

function isCandidate(path: string): 'module' | 'dep' | undefined {
  if (isModuleFileName(path)) return 'module';
  if (path === 'modules.dep' || path.endsWith('/modules.dep')) return 'dep';
  return undefined;
}

/** Decompressed-bytes counter that refuses past the cap. */
class Counter extends Transform {
  bytes = 0;
  private readonly max: number;
  private readonly onExceed: () => void;
  constructor(max: number, onExceed: () => void) {
    super({ highWaterMark: 64 * 1024 });
    this.max = max;
    this.onExceed = onExceed;
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.bytes += chunk.length;
    if (this.bytes > this.max) {
      this.onExceed();
      cb();
      return;
    }
    cb(null, chunk);
  }
}

function abortError(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('The operation was aborted', 'AbortError');
}

/**
 * Scans a layer blob stream. Resolves with the result (refusals included); rejects with the blob
 * stream's error (a `RegistryError` such as `DigestMismatch`, a network error) or, on abort, with
 * the signal's reason. The stream is consumed to its end or destroyed.
 */
export async function scanLayer(blob: Readable, options: ScanLayerOptions): Promise<LayerScanResult> {
  const limits: LayerScanLimits = { ...DEFAULT_LAYER_SCAN_LIMITS, ...options.limits };
  const { digest, signal } = options;
  const entries = new Map<string, LayerEntry>();
  const whiteouts = new Set<string>();
  const opaqueDirs = new Set<string>();
  let entryCount = 0;
  let compressedBytes = 0;
  let compression: LayerCompression = 'none';
  let refusal: LayerRefusal | undefined;
  let decomp: Transform | undefined;
  let counter: Counter | undefined;
  let extract: Extract | undefined;
  let inner: Promise<void> | undefined;
  let aborted = false;

  const stopInner = (): void => {
    decomp?.destroy();
    counter?.destroy();
    extract?.destroy();
  };
  const refuse = (code: LayerRefusalCode, reason: string): void => {
    if (refusal) return;
    refusal = { code, reason: `layer ${digest} ${reason}` };
    stopInner();
  };

  const tooMany = (reason: string): never => {
    refuse('TooManyEntries', reason);
    throw new TooManyError(reason);
  };

  const record = (path: string, entry: LayerEntry): void => {
    if (!entries.has(path) && entries.size >= limits.maxRecordedEntries) {
      tooMany(`has more than ${limits.maxRecordedEntries} entries to index`);
    }
    entries.delete(path); // a later entry for the same path replaces the earlier one
    entries.set(path, entry);
  };

  async function handleEntry(entry: Entry): Promise<void> {
    const header = entry.header;
    entryCount++;
    if (entryCount > limits.maxEntries) tooMany(`has more than ${limits.maxEntries} entries`);
    const path = normalizeEntryPath(header.name);
    if (path === undefined) {
      refuse('PathEscape', `has a path that leaves the root: ${header.name}`);
      throw new PathEscapeError(header.name);
    }
    const type: string = header.type ?? 'file';
    const slash = path.lastIndexOf('/');
    const dir = slash === -1 ? '' : path.slice(0, slash);
    const base = path.slice(slash + 1);

    if (base.startsWith('.wh.')) {
      if (base === '.wh..wh..opq') opaqueDirs.add(dir);
      else if (!base.startsWith('.wh..wh.')) whiteouts.add(dir === '' ? base.slice(4) : `${dir}/${base.slice(4)}`);
      await drain(entry);
      return;
    }
    if (path === '') {
      await drain(entry); // the root itself (`./`)
      return;
    }

    switch (type) {
      case 'file':
      case 'contiguous-file': {
        const size = header.size ?? 0;
        const candidate = isCandidate(path);
        if (!candidate) {
          await drain(entry);
          if (isStructural(path, 'file')) record(path, { type: 'file', size });
          return;
        }
        const facts = await readCandidate(entry, path, size, candidate);
        record(path, { type: 'file', size, ...facts });
        return;
      }
      case 'directory':
        await drain(entry);
        if (isStructural(path, 'dir')) record(path, { type: 'dir' });
        return;
      case 'symlink':
        await drain(entry);
        record(path, { type: 'symlink', target: header.linkname ?? '' });
        return;
      case 'link': {
        await drain(entry);
        const target = normalizeEntryPath(header.linkname ?? '');
        if (target === undefined) {
          refuse('PathEscape', `has a hard link that leaves the root: ${path} -> ${header.linkname ?? ''}`);
          throw new PathEscapeError(header.linkname ?? '');
        }
        if (!isCandidate(path) && !isStructural(path, 'file')) return;
        const linked = entries.get(target);
        if (linked?.type === 'file') {
          const { linkOf: _ignored, ...rest } = linked;
          record(path, { ...rest, linkOf: target });
        } else if (linked?.type === 'hardlink') {
          record(path, linked);
        } else if (entries.has(target) || isCandidate(target)) {
          record(path, { type: 'hardlink', target });
        } else {
          // A link to a file of this layer that was not buffered (not named like a module).
          record(path, {
            type: 'file',
            size: header.size ?? 0,
            ...(isCandidate(path) ? { error: `it is a hard link to ${target}, whose content was not examined`, linkOf: target } : {}),
          });
        }
        return;
      }
      case 'character-device':
      case 'block-device':
      case 'fifo':
        await drain(entry);
        if (isStructural(path, 'other')) record(path, { type: 'other' });
        return;
      default:
        await drain(entry);
    }
  }

  async function readCandidate(entry: Entry, path: string, size: number, kind: 'module' | 'dep'): Promise<FileFacts> {
    const max = limits.maxCandidateBytes;
    if (size > max) {
      await drain(entry);
      return { error: `it is larger than ${formatBytes(max)} (${size} bytes)`, errorLimit: max };
    }
    const chunks: Buffer[] = [];
    for await (const chunk of entry) chunks.push(chunk as Buffer);
    const data = Buffer.concat(chunks);
    if (kind === 'dep') return { modulesDep: parseModulesDep(data.toString('utf8')) };
    try {
      return { module: await readModuleInfo(data, path, max) };
    } catch (err) {
      if (!(err instanceof ModinfoError)) throw err;
      const overLimit = /decompresses to more than/.test(err.message);
      return { error: err.message, ...(overLimit ? { errorLimit: max } : {}) };
    }
  }

  async function consumeEntries(ex: Extract): Promise<void> {
    for await (const entry of ex) {
      if (refusal) break;
      await handleEntry(entry);
    }
  }

  const startInner = (head: Buffer): void => {
    compression = detectCompression(head);
    decomp =
      compression === 'gzip'
        ? zlib.createGunzip({ chunkSize: 64 * 1024 })
        : compression === 'zstd'
          ? zlib.createZstdDecompress({
              chunkSize: 64 * 1024,
              params: { [zlib.constants.ZSTD_d_windowLogMax]: limits.zstdWindowLogMax },
            })
          : new Transform({ transform: (c: Buffer, _e, cb) => cb(null, c) });
    counter = new Counter(limits.maxUncompressedBytes, () =>
      refuse(
        'DecompressionLimit',
        `decompresses to more than ${formatBytes(limits.maxUncompressedBytes)}: refused as a decompression bomb`,
      ),
    );
    extract = tarExtract();
    const ex = extract;
    const piping = pipeline(decomp, counter, ex);
    const consuming = consumeEntries(ex);
    inner = Promise.all([piping, consuming]).then(
      () => undefined,
      (err: unknown) => {
        if (refusal || aborted) return;
        refuse('InvalidArchive', `is not a valid ${compression === 'none' ? '' : `${compression}-compressed `}tar archive: ${(err as Error).message}`);
      },
    );
    // Keep both settled: errors are handled through `inner`.
    piping.catch(() => undefined);
    consuming.catch(() => undefined);
  };

  const onAbort = (): void => {
    aborted = true;
    stopInner();
    blob.destroy(signal ? (abortError(signal) as Error) : undefined);
  };
  if (signal?.aborted) {
    blob.destroy();
    throw abortError(signal);
  }
  signal?.addEventListener('abort', onAbort, { once: true });

  try {
    const head: Buffer[] = [];
    let headLength = 0;
    for await (const chunk of blob as AsyncIterable<Buffer>) {
      compressedBytes += chunk.length;
      if (refusal) continue; // read to the end for the digest check, without decompressing
      if (!decomp) {
        head.push(chunk);
        headLength += chunk.length;
        if (headLength < 4) continue;
        startInner(Buffer.concat(head));
        await write(decomp!, Buffer.concat(head));
        continue;
      }
      await write(decomp, chunk);
    }
    if (!decomp) {
      startInner(Buffer.concat(head));
      if (headLength > 0) await write(decomp!, Buffer.concat(head));
    }
    if (!refusal) decomp!.end();
    await inner;
  } catch (err) {
    stopInner();
    await inner?.catch(() => undefined);
    if (signal?.aborted) throw abortError(signal);
    throw err;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  if (signal?.aborted) throw abortError(signal);

  const uncompressedBytes = (counter as Counter | undefined)?.bytes ?? 0;
  // Hard links to files that came later in the archive than the link (unusual, but allowed).
  for (const [path, e] of entries) {
    if (e.type !== 'hardlink') continue;
    const target = entries.get(e.target);
    if (target?.type === 'file') {
      const { linkOf: _ignored, ...rest } = target;
      entries.set(path, { ...rest, linkOf: e.target });
    }
  }
  const base = {
    version: LAYER_SCAN_VERSION,
    digest,
    compression,
    compressedBytes,
    uncompressedBytes,
    entryCount,
    limits,
  };
  if (refusal) return { ...base, refused: refusal, entries: {}, whiteouts: [], opaqueDirs: [] };
  return {
    ...base,
    entries: Object.fromEntries(entries),
    whiteouts: [...whiteouts],
    opaqueDirs: [...opaqueDirs],
  };
}

class TooManyError extends Error {}

/** Reads an entry to its end without keeping it. */
async function drain(entry: Entry): Promise<void> {
  for await (const _chunk of entry) {
    // discard
  }
}

/** Writes with back-pressure; resolves early when the stream is destroyed. */
function write(stream: Transform, chunk: Buffer): Promise<void> {
  if (stream.destroyed) return Promise.resolve();
  if (stream.write(chunk)) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    stream.on('drain', done);
    stream.on('close', done);
  });
}

/**
 * Whether a cached scan can be reused under `limits`: a result shaped by a limit (a refusal, or a
 * file over the candidate cap) is only valid while the limits are not larger.
 */
export function isScanReusable(result: LayerScanResult, limits: Partial<LayerScanLimits> = {}): boolean {
  if (result.version !== LAYER_SCAN_VERSION) return false;
  const l: LayerScanLimits = { ...DEFAULT_LAYER_SCAN_LIMITS, ...limits };
  const r = result.limits;
  switch (result.refused?.code) {
    case 'DecompressionLimit':
      return l.maxUncompressedBytes <= r.maxUncompressedBytes;
    case 'TooManyEntries':
      return l.maxEntries <= r.maxEntries && l.maxRecordedEntries <= r.maxRecordedEntries;
    case 'PathEscape':
    case 'InvalidArchive':
      return true;
    case undefined:
      break;
  }
  if (l.maxCandidateBytes > r.maxCandidateBytes) {
    for (const e of Object.values(result.entries)) if (e.type === 'file' && e.errorLimit !== undefined) return false;
  }
  return true;
}

export { detectCompression, type LayerCompression };
