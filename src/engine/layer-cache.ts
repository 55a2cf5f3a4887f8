/**
 * Caches of layer scans by layer digest. A scan depends only on the layer's bytes (see
 * layer-scan.ts), so one entry serves every image, Module and kernel that shares the layer.
 *
 * - {@link createMemoryLayerCache}: an LRU bounded by entry count and by approximate size.
 * - {@link createDiskLayerCache}: one JSON file per digest in a directory, written atomically
 *   (temporary file + rename), so concurrent processes and crashes never leave a torn entry; an
 *   unreadable or foreign file reads as a miss. A small memory LRU sits in front by default.
 * - {@link createTieredLayerCache}: memory in front of disk.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LAYER_SCAN_VERSION, type LayerScanResult } from './layer-scan.ts';

export interface LayerCache {
  get(digest: string): Promise<LayerScanResult | undefined>;
  set(digest: string, result: LayerScanResult): Promise<void>;
}

const DIGEST_RE = /^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$/;

/** Whether `digest` is a well-formed OCI digest (and so safe as a file name once `:` is replaced). */
export function isDigest(digest: string): boolean {
  return DIGEST_RE.test(digest);
}

function approximateSize(result: LayerScanResult): number {
  return JSON.stringify(result).length;
}

export interface MemoryLayerCacheOptions {
  /** Entries kept (default 10,000). */
  readonly maxEntries?: number;
  /** Approximate bytes of JSON kept (default 256 MiB). */
  readonly maxBytes?: number;
}

export interface MemoryLayerCache extends LayerCache {
  readonly size: number;
  readonly bytes: number;
  clear(): void;
}

export function createMemoryLayerCache(options: MemoryLayerCacheOptions = {}): MemoryLayerCache {
  const maxEntries = options.maxEntries ?? 10_000;
  const maxBytes = options.maxBytes ?? 256 * 1024 ** 2;
  // A Map iterates in insertion order: re-inserting on use makes the first key the least recent.
  const entries = new Map<string, { result: LayerScanResult; size: number }>();
  let bytes = 0;
  const evict = (): void => {
    while (entries.size > maxEntries || (bytes > maxBytes && entries.size > 1)) {
      const oldest = entries.keys().next();
      if (oldest.done) return;
      bytes -= entries.get(oldest.value)!.size;
      entries.delete(oldest.value);
    }
  };
  return {
    async get(digest) {
      const e = entries.get(digest);
      if (!e) return undefined;
      entries.delete(digest);
      entries.set(digest, e);
      return e.result;
    },
    async set(digest, result) {
      const old = entries.get(digest);
      if (old) {
        bytes -= old.size;
        entries.delete(digest);
      }
      const size = approximateSize(result);
      if (size > maxBytes) return; // larger than the whole cache: not kept
      entries.set(digest, { result, size });
      bytes += size;
      evict();
    },
    get size() {
      return entries.size;
    },
    get bytes() {
      return bytes;
    },
    clear() {
      entries.clear();
      bytes = 0;
    },
  };
}

export interface DiskLayerCacheOptions {
  /** The directory (created when missing). */
  readonly dir: string;
  /**
   * An in-memory LRU in front of the files (default on, 256 entries), so that repeated
   * validations in one process neither re-read nor re-parse the JSON; `false` for none.
   */
  readonly memory?: MemoryLayerCacheOptions | false;
}

export interface DiskLayerCache extends LayerCache {
  readonly dir: string;
  /** The file that holds (or would hold) `digest`'s scan. */
  pathOf(digest: string): string;
}

export function createDiskLayerCache(options: DiskLayerCacheOptions): DiskLayerCache {
  const { dir } = options;
  const memory = options.memory === false ? undefined : createMemoryLayerCache({ maxEntries: 256, ...options.memory });
  let made: Promise<unknown> | undefined;
  const pathOf = (digest: string): string => {
    if (!isDigest(digest)) throw new Error(`not a digest: ${JSON.stringify(digest)}`);
    return join(dir, `${digest.replace(':', '-')}.v${LAYER_SCAN_VERSION}.json`);
  };
  return {
    dir,
    pathOf,
    async get(digest) {
      if (!isDigest(digest)) return undefined;
      const remembered = await memory?.get(digest);
      if (remembered) return remembered;
      let text: string;
      try {
        text = await readFile(pathOf(digest), 'utf8');
      } catch {
        return undefined;
      }
      try {
        const parsed = JSON.parse(text) as LayerScanResult;
        if (parsed?.version !== LAYER_SCAN_VERSION || parsed.digest !== digest || typeof parsed.entries !== 'object') {
          return undefined;
        }
        await memory?.set(digest, parsed);
        return parsed;
      } catch {
        await rm(pathOf(digest), { force: true }).catch(() => undefined);
        return undefined;
      }
    },
    async set(digest, result) {
      const target = pathOf(digest);
      made ??= mkdir(dir, { recursive: true });
      await made;
      const tmp = join(dir, `.${digest.replace(':', '-')}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
      try {
        await writeFile(tmp, JSON.stringify(result), { mode: 0o644 });
        await rename(tmp, target);
        await memory?.set(digest, result);
      } catch (err) {
        await rm(tmp, { force: true }).catch(() => undefined);
        throw err;
      }
    },
  };
}

/** `front` (memory) answers first; a `back` (disk) hit is copied to the front. */
export function createTieredLayerCache(front: LayerCache, back: LayerCache): LayerCache {
  return {
    async get(digest) {
      const hit = await front.get(digest);
      if (hit) return hit;
      const fromBack = await back.get(digest);
      if (fromBack) await front.set(digest, fromBack);
      return fromBack;
    },
    async set(digest, result) {
      await Promise.all([front.set(digest, result), back.set(digest, result)]);
    },
  };
}
