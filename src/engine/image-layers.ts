/**
 * Reading files out of an image and building an image one layer taller: what the Sign stage does
 * to a module image (the signed `.ko` files go into a new top layer over the unsigned image).
 *
 * - {@link readImageFiles} reads the merged file system top-down: a layer's entries count only
 *   where no upper layer decided the path (OCI whiteouts `.wh.<name>`, opaque directories
 *   `.wh..wh..opq`, an upper file, link or directory at the same path, an upper non-directory at a
 *   parent). Every layer is read, since any of them may add files; the content of files the
 *   upper layers hide is never kept.
 * - {@link appendLayer} writes one deterministic gzip layer (sorted entries, parent directories,
 *   fixed time and owner), a config with the layer's diff ID and a history entry, and a manifest of
 *   the base's media-type family: the same files give the same digests, so signing again pushes
 *   nothing new.
 * - {@link pushImage} mounts the base's layers into the target repository when it is in the same
 *   registry, and copies them (streamed, never held in memory) otherwise.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import tar, { type Extract, type Header } from 'tar-stream';
import { parseImageReference, withDefaultTag, type ImageReference } from '../image/reference.ts';
import { MEDIA_TYPES, type RegistryHttpClient } from '../registry/client.ts';
import {
  RegistryError,
  type Descriptor,
  type Platform,
  type RegistryAccess,
  type RegistryClient,
  type RequestOptions,
  type ResolvedImage,
} from '../registry/types.ts';
import { decompressed } from './decompress.ts';
import { DEFAULT_LAYER_SCAN_LIMITS, normalizeEntryPath } from './layer-scan.ts';
import { formatBytes } from './modinfo.ts';

const gzip = promisify(zlib.gzip);

export interface ImageFile {
  /** Absolute and normalised, e.g. `/opt/lib/modules/6.1.0-18-amd64/extra/a.ko`. */
  readonly path: string;
  readonly data: Buffer;
  /** Permission bits (`0o644`), as in the tar header. */
  readonly mode: number;
}

export type ImageLayersErrorCode =
  | 'PathEscape' // a tar entry, hard link or file to write leaves the root (`..`)
  | 'FileTooLarge' // a wanted file is over maxFileBytes
  | 'TotalTooLarge' // the wanted files together are over maxTotalBytes
  | 'LayerTooLarge' // a layer decompresses beyond maxLayerBytes (a decompression bomb)
  | 'InvalidArchive' // a layer is not a valid (compressed) tar
  | 'InvalidFile' // a file to write has an empty path or comes twice
  | 'InvalidConfig' // the base image's config is not a JSON object with rootfs.diff_ids
  | 'InvalidTarget'; // the push target is not a reference with a tag

/** A refusal of this module (registry failures stay {@link RegistryError}s). */
export class ImageLayersError extends Error {
  readonly code: ImageLayersErrorCode;
  constructor(code: ImageLayersErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ImageLayersError';
    this.code = code;
  }
}

export interface ReadImageFilesOptions {
  readonly signal?: AbortSignal;
  /** Largest wanted file (default 256 MiB). */
  readonly maxFileBytes?: number;
  /** Largest sum of the wanted files (default 1 GiB). */
  readonly maxTotalBytes?: number;
  /** Largest decompressed layer (default 8 GiB, as the Image stage). */
  readonly maxLayerBytes?: number;
}

const DEFAULT_MAX_FILE_BYTES = 256 * 1024 ** 2;
const DEFAULT_MAX_TOTAL_BYTES = 1024 ** 3;
const MAX_CONFIG_BYTES = 16 * 1024 ** 2;
/** Hard links to hard links are resolved this deep (tar writers link to the first copy). */
const MAX_LINK_DEPTH = 4;

// ---------------------------------------------------------------------------------------------
// Reading

/** What the layers above the one being read decide. Paths are relative (`opt/lib`), `''` is the root. */
interface Upper {
  /** Paths with an entry (any type, directories implied by deeper paths too): a lower entry there is hidden. */
  readonly covered: Set<string>;
  /** Paths under which every lower entry is hidden (upper non-directories, whiteouts, opaque dirs). */
  readonly hiddenTrees: Set<string>;
}

interface ReadContext {
  readonly registry: RegistryClient;
  readonly ref: ImageReference;
  readonly image: string;
  readonly access: RegistryAccess;
  readonly request: RequestOptions;
  readonly signal: AbortSignal | undefined;
  readonly maxFileBytes: number;
  readonly maxTotalBytes: number;
  readonly maxLayerBytes: number;
  totalBytes: number;
}

interface PendingLink {
  readonly target: string;
  readonly mode: number;
  /** Index (top-down) of the layer holding the link: the target is looked up from there down. */
  readonly layer: number;
}

function isHidden(path: string, upper: Upper): boolean {
  if (upper.covered.has(path) || upper.hiddenTrees.has('')) return true;
  for (let i = path.lastIndexOf('/'); i > 0; i = path.lastIndexOf('/', i - 1)) {
    if (upper.hiddenTrees.has(path.slice(0, i))) return true;
  }
  return false;
}

function addParents(path: string, into: Set<string>): void {
  for (let i = path.lastIndexOf('/'); i > 0; i = path.lastIndexOf('/', i - 1)) {
    const dir = path.slice(0, i);
    if (into.has(dir)) return;
    into.add(dir);
  }
}

async function drain(entry: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of entry) {
    // discarded
  }
}

/**
 * Reads the regular files of `layers` (top first) merged, for which `match` is true, keyed by
 * relative path. Hard links found are resolved against the merged view from their layer down.
 */
async function readMerged(ctx: ReadContext, layers: readonly Descriptor[], match: (path: string) => boolean, depth: number): Promise<Map<string, ImageFile>> {
  const upper: Upper = { covered: new Set(), hiddenTrees: new Set() };
  const files = new Map<string, ImageFile>();
  const pending = new Map<string, PendingLink>();
  for (let index = 0; index < layers.length; index++) {
    const layer = layers[index]!;
    const covered = new Set<string>();
    const hiddenTrees = new Set<string>();
    const captured = new Map<string, ImageFile>();
    const links = new Map<string, PendingLink>();
    const where = `layer ${layer.digest} of image ${ctx.image}`;

    const onEntry = async (header: Header, entry: AsyncIterable<Buffer>): Promise<void> => {
      const path = normalizeEntryPath(header.name);
      if (path === undefined) throw new ImageLayersError('PathEscape', `${where} has a path that leaves the root: ${header.name}`);
      if (path === '') return drain(entry);
      const slash = path.lastIndexOf('/');
      const dir = slash === -1 ? '' : path.slice(0, slash);
      const base = path.slice(slash + 1);
      addParents(path, covered);
      if (base.startsWith('.wh.')) {
        if (base === '.wh..wh..opq') hiddenTrees.add(dir);
        else if (!base.startsWith('.wh..wh.')) {
          const gone = dir === '' ? base.slice(4) : `${dir}/${base.slice(4)}`;
          covered.add(gone);
          hiddenTrees.add(gone);
        }
        return drain(entry);
      }
      const type = header.type ?? 'file';
      covered.add(path);
      if (type !== 'directory') hiddenTrees.add(path);
      // A later entry for the same path replaces an earlier one of the same layer.
      captured.delete(path);
      links.delete(path);
      const wanted = !isHidden(path, upper) && match(`/${path}`);
      if (type === 'link') {
        const target = normalizeEntryPath(header.linkname ?? '');
        if (target === undefined) throw new ImageLayersError('PathEscape', `${where} has a hard link that leaves the root: ${path} -> ${header.linkname ?? ''}`);
        if (wanted) {
          const mode = (header.mode ?? 0o644) & 0o7777;
          const same = captured.get(target);
          if (same !== undefined) captured.set(path, { path: `/${path}`, data: same.data, mode });
          else links.set(path, { target, mode, layer: index });
        }
        return drain(entry);
      }
      if (!wanted || (type !== 'file' && type !== 'contiguous-file')) return drain(entry);
      const size = header.size ?? 0;
      if (size > ctx.maxFileBytes) {
        throw new ImageLayersError('FileTooLarge', `file /${path} in ${where} is ${formatBytes(size)}, over the limit of ${formatBytes(ctx.maxFileBytes)}`);
      }
      if (ctx.totalBytes + size > ctx.maxTotalBytes) {
        throw new ImageLayersError('TotalTooLarge', `the files wanted from image ${ctx.image} are over the limit of ${formatBytes(ctx.maxTotalBytes)} together (at /${path})`);
      }
      ctx.totalBytes += size;
      const chunks: Buffer[] = [];
      for await (const chunk of entry) chunks.push(chunk);
      captured.set(path, { path: `/${path}`, data: Buffer.concat(chunks), mode: (header.mode ?? 0o644) & 0o7777 });
    };

    await readLayer(ctx, layer, where, onEntry);
    for (const [path, file] of captured) files.set(path, file);
    for (const [path, link] of links) {
      const same = captured.get(link.target);
      if (same !== undefined) files.set(path, { path: `/${path}`, data: same.data, mode: link.mode });
      else pending.set(path, link);
    }
    for (const p of covered) upper.covered.add(p);
    for (const p of hiddenTrees) upper.hiddenTrees.add(p);
  }

  // Hard links to files that were not wanted themselves, or that lie in lower layers: read those
  // targets as the link's layer sees them. Rare; costs a second download of the layers concerned.
  if (pending.size > 0 && depth < MAX_LINK_DEPTH) {
    const byLayer = new Map<number, Map<string, PendingLink>>();
    for (const [path, link] of pending) {
      const group = byLayer.get(link.layer) ?? new Map<string, PendingLink>();
      group.set(path, link);
      byLayer.set(link.layer, group);
    }
    for (const [layer, group] of byLayer) {
      const targets = new Set([...group.values()].map((l) => `/${l.target}`));
      const found = await readMerged(ctx, layers.slice(layer), (p) => targets.has(p), depth + 1);
      for (const [path, link] of group) {
        const target = found.get(link.target);
        if (target !== undefined) files.set(path, { path: `/${path}`, data: target.data, mode: link.mode });
      }
    }
  }
  return files;
}

/** Streams one layer's tar entries through `onEntry`; the blob is read to its end (digest check). */
async function readLayer(ctx: ReadContext, layer: Descriptor, where: string, onEntry: (header: Header, entry: AsyncIterable<Buffer>) => Promise<void>): Promise<void> {
  const blob = await ctx.registry.openBlob(ctx.ref, layer, ctx.access, ctx.request);
  const extract: Extract = tar.extract();
  const piping = pipeline(decompressed(blob, { maxOutputBytes: ctx.maxLayerBytes }), extract, ctx.signal ? { signal: ctx.signal } : {});
  piping.catch(() => undefined); // observed below
  try {
    for await (const entry of extract) await onEntry(entry.header, entry as unknown as AsyncIterable<Buffer>);
    await piping;
  } catch (err) {
    extract.destroy();
    blob.destroy();
    await piping.catch(() => undefined);
    ctx.signal?.throwIfAborted();
    if (err instanceof RegistryError || err instanceof ImageLayersError) throw err;
    const message = (err as Error).message ?? String(err);
    if (/decompression bomb/.test(message)) throw new ImageLayersError('LayerTooLarge', `${where} ${message}`, { cause: err });
    throw new ImageLayersError('InvalidArchive', `${where} is not a valid tar archive: ${message}`, { cause: err });
  }
}

/**
 * Reads the regular files of an image's merged file system (all layers, OCI whiteouts and opaque
 * directories applied, hard links resolved) whose absolute path satisfies `match`.
 *
 * Paths are those the tar entries spell: symbolic links are not followed, neither a symlink file
 * (not returned) nor a symlinked directory (`/lib -> usr/lib`: files are found under `/usr/lib`
 * only). Bounded by `maxFileBytes` and `maxTotalBytes` (over either: {@link ImageLayersError}
 * `FileTooLarge` / `TotalTooLarge`); an entry leaving the root refuses the image (`PathEscape`).
 * Registry failures reject with their {@link RegistryError}. Files come sorted by path.
 */
export async function readImageFiles(
  registry: RegistryClient,
  image: string,
  access: RegistryAccess,
  platform: Platform,
  match: (path: string) => boolean,
  options: ReadImageFilesOptions = {},
): Promise<{ resolved: ResolvedImage; files: ImageFile[] }> {
  const ref = withDefaultTag(parseImageReference(image));
  const request: RequestOptions = options.signal ? { signal: options.signal } : {};
  const resolved = await registry.resolveImage(ref, access, platform, request);
  const ctx: ReadContext = {
    registry,
    ref,
    image,
    access,
    request,
    signal: options.signal,
    maxFileBytes: options.maxFileBytes ?? DEFAULT_MAX_FILE_BYTES,
    maxTotalBytes: options.maxTotalBytes ?? DEFAULT_MAX_TOTAL_BYTES,
    maxLayerBytes: options.maxLayerBytes ?? DEFAULT_LAYER_SCAN_LIMITS.maxUncompressedBytes,
    totalBytes: 0,
  };
  const merged = await readMerged(ctx, [...resolved.layers].reverse(), match, 0);
  const files = [...merged.values()].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  return { resolved, files };
}

// ---------------------------------------------------------------------------------------------
// Building

export interface BuiltImage {
  readonly manifest: Buffer;
  readonly mediaType: string;
  /** Digest of `manifest`. */
  readonly digest: string;
  readonly config: Buffer;
  readonly configDescriptor: Descriptor;
  /** The new top layer: its descriptor, stored (gzip) bytes and diff ID (digest of the tar). */
  readonly layer: { readonly descriptor: Descriptor; readonly data: Buffer; readonly diffId: string };
  readonly base: { readonly image: string; readonly access: RegistryAccess; readonly resolved: ResolvedImage };
}

export interface AppendLayerOptions {
  readonly signal?: AbortSignal;
  /** `created_by` of the history entry (default `kmm-preflight: signed <n> files`). */
  readonly history?: string;
}

const DOCKER_LAYER_GZIP = 'application/vnd.docker.image.rootfs.diff.tar.gzip';
const OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
const EPOCH = new Date(0);

function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** Hashes in slices of a few milliseconds each, so a large layer does not hold up the event loop. */
async function sha256Sliced(data: Buffer): Promise<string> {
  const slice = 4 * 1024 ** 2;
  const hash = createHash('sha256');
  for (let i = 0; i < data.length; i += slice) {
    if (i > 0) await yieldToLoop();
    hash.update(data.subarray(i, i + slice));
  }
  return `sha256:${hash.digest('hex')}`;
}

async function readAll(stream: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
  return Buffer.concat(chunks);
}

/** A tar of `files` and their parent directories, sorted, owned by root, at time 0. */
async function deterministicTar(files: ReadonlyMap<string, ImageFile>): Promise<Buffer> {
  const dirs = new Set<string>();
  for (const path of files.keys()) addParents(path, dirs);
  const names = [...dirs, ...files.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const pack = tar.pack();
  const collected = readAll(pack as AsyncIterable<Uint8Array>);
  const owner = { uid: 0, gid: 0, uname: 'root', gname: 'root', mtime: EPOCH };
  for (const name of names) {
    const file = files.get(name);
    await new Promise<void>((resolve, reject) => {
      const done = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (file === undefined) pack.entry({ ...owner, name: `${name}/`, type: 'directory', mode: 0o755 }, done);
      else pack.entry({ ...owner, name, type: 'file', mode: file.mode & 0o7777, size: file.data.length }, file.data, done);
    });
  }
  pack.finalize();
  return collected;
}

/**
 * Builds a new image: `base` plus one gzip layer holding `files` (at their paths, with their
 * modes). The config gets the layer's diff ID and, when the base has a history, an entry for
 * it; the manifest has the base's media type (OCI or Docker v2) and the base's layers. Nothing is
 * pushed. Paths with `..` are refused (`PathEscape`), as are duplicates (`InvalidFile`).
 */
export async function appendLayer(
  registry: RegistryClient,
  base: { readonly image: string; readonly access: RegistryAccess; readonly resolved: ResolvedImage },
  files: readonly ImageFile[],
  options: AppendLayerOptions = {},
): Promise<BuiltImage> {
  const byPath = new Map<string, ImageFile>();
  for (const file of files) {
    const path = normalizeEntryPath(file.path);
    if (path === undefined) throw new ImageLayersError('PathEscape', `cannot write ${file.path} into a layer: the path leaves the root`);
    if (path === '') throw new ImageLayersError('InvalidFile', `cannot write a file without a name (${JSON.stringify(file.path)}) into a layer`);
    if (byPath.has(path)) throw new ImageLayersError('InvalidFile', `cannot write /${path} into a layer twice`);
    byPath.set(path, file);
  }
  const tarBytes = await deterministicTar(byPath);
  const data = await gzip(tarBytes);
  const diffId = await sha256Sliced(tarBytes);
  const { resolved } = base;
  const docker = resolved.mediaType === MEDIA_TYPES.dockerManifest;
  const descriptor: Descriptor = { mediaType: docker ? DOCKER_LAYER_GZIP : OCI_LAYER_GZIP, digest: await sha256Sliced(data), size: data.length };

  if (resolved.config.size > MAX_CONFIG_BYTES) {
    throw new ImageLayersError('InvalidConfig', `the config of image ${base.image} is ${formatBytes(resolved.config.size)}, over the limit of ${formatBytes(MAX_CONFIG_BYTES)}`);
  }
  const request: RequestOptions = options.signal ? { signal: options.signal } : {};
  const baseConfig = await readAll(await registry.openBlob(resolved.reference, resolved.config, base.access, request));
  let doc: unknown;
  try {
    doc = JSON.parse(baseConfig.toString('utf8'));
  } catch (err) {
    throw new ImageLayersError('InvalidConfig', `the config of image ${base.image} is not JSON`, { cause: err });
  }
  const config = doc as Record<string, unknown>;
  const rootfs = typeof doc === 'object' && doc !== null && !Array.isArray(doc) ? (config['rootfs'] as Record<string, unknown> | undefined) : undefined;
  if (typeof rootfs !== 'object' || rootfs === null || !Array.isArray(rootfs['diff_ids'])) {
    throw new ImageLayersError('InvalidConfig', `the config of image ${base.image} has no rootfs.diff_ids`);
  }
  rootfs['diff_ids'] = [...(rootfs['diff_ids'] as unknown[]), diffId];
  // Without a history in the base, one entry would not match the layers: history stays absent.
  if (Array.isArray(config['history'])) {
    config['history'] = [
      ...(config['history'] as unknown[]),
      {
        ...(typeof config['created'] === 'string' ? { created: config['created'] } : {}),
        created_by: options.history ?? `kmm-preflight: signed ${byPath.size} file${byPath.size === 1 ? '' : 's'}`,
      },
    ];
  }
  const configBytes = Buffer.from(JSON.stringify(config));
  const configDescriptor: Descriptor = { mediaType: resolved.config.mediaType, digest: sha256(configBytes), size: configBytes.length };
  const mediaType = docker ? MEDIA_TYPES.dockerManifest : MEDIA_TYPES.ociManifest;
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType,
      config: configDescriptor,
      layers: [...resolved.layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.size })), descriptor],
    }),
  );
  return { manifest, mediaType, digest: sha256(manifest), config: configBytes, configDescriptor, layer: { descriptor, data, diffId }, base };
}

// ---------------------------------------------------------------------------------------------
// Pushing

export interface PushImageOptions {
  readonly signal?: AbortSignal;
  /** How to read the base image's layers when they are copied (default: the base's access). */
  readonly baseAccess?: RegistryAccess;
  /** Base layers moved at once (default 3). */
  readonly concurrency?: number;
}

/** Failures worth no second way: copying would meet them as well. */
const TRANSIENT: ReadonlySet<string> = new Set(['Unreachable', 'Timeout', 'RateLimited', 'ServerError']);

/**
 * A blob of the base image, opened only when the upload reads it (pushBlob skips blobs the
 * target has). Its own failure is kept, since the upload reports it as a broken request body.
 */
function lazyBlob(open: () => Promise<Readable>): { stream: Readable; failure: () => unknown } {
  let failure: unknown;
  const stream = Readable.from(
    (async function* () {
      try {
        yield* (await open()) as AsyncIterable<Buffer>;
      } catch (err) {
        failure = err;
        throw err;
      }
    })(),
    { objectMode: false },
  );
  return { stream, failure: () => failure };
}

async function eachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
}

/**
 * Pushes `built` as `target` (a tag; `latest` when none is given): the base's layers (mounted
 * from the base repository in the same registry, else streamed from it), the new layer, the
 * config, then the manifest. Returns the manifest digest. Rejects with {@link RegistryError}s,
 * and with `InvalidTarget` for a reference that cannot be parsed or has only a digest.
 */
export async function pushImage(
  client: RegistryHttpClient,
  built: BuiltImage,
  target: string,
  access: RegistryAccess,
  options: PushImageOptions = {},
): Promise<string> {
  let targetRef: ImageReference;
  try {
    targetRef = withDefaultTag(parseImageReference(target));
  } catch (err) {
    throw new ImageLayersError('InvalidTarget', (err as Error).message, { cause: err });
  }
  if (targetRef.tag === undefined) {
    throw new ImageLayersError('InvalidTarget', `cannot push to ${target}: a new image has a new digest, so the target needs a tag`);
  }
  const request: RequestOptions = options.signal ? { signal: options.signal } : {};
  const baseRef = built.base.resolved.reference;
  const baseAccess = options.baseAccess ?? built.base.access;
  const sameRegistry = targetRef.domain === baseRef.domain;
  const sameRepository = sameRegistry && targetRef.path === baseRef.path;

  await eachLimited(built.base.resolved.layers, options.concurrency ?? 3, async (layer) => {
    if (sameRepository) return; // the base's blobs are there
    if (sameRegistry) {
      try {
        if (await client.mountBlob(targetRef, baseRef, layer.digest, access, request)) return;
      } catch (err) {
        // Credentials that may push to the target but not read the base: copy with the base's.
        if (!(err instanceof RegistryError) || TRANSIENT.has(err.code)) throw err;
      }
    }
    const blob = lazyBlob(() => client.openBlob(baseRef, layer, baseAccess, request));
    try {
      await client.pushBlob(targetRef, blob.stream, layer.digest, access, request);
    } catch (err) {
      throw blob.failure() ?? err;
    }
  });
  await client.pushBlob(targetRef, built.layer.data, built.layer.descriptor.digest, access, request);
  await client.pushBlob(targetRef, built.config, built.configDescriptor.digest, access, request);
  return client.pushManifest(targetRef, built.manifest, built.mediaType, access, request);
}
