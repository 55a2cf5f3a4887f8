/**
 * Builds images for tests and pushes them to a {@link TestRegistry} through the client's pusher:
 * layers from file lists (tar-stream), compressed with gzip, zstd or not at all, an image config
 * with the layers' diff IDs, a Docker v2 or OCI manifest, and multi-platform indexes.
 *
 * Also raw material for hostile-layer tests: tars with arbitrary entry names (`../`, absolute
 * paths, links out of the tree) and a gzip bomb streamed through zlib without holding the
 * expanded bytes in memory.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip, gunzipSync, gzipSync, zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import tar, { type Header } from 'tar-stream';

/** A tar header as tar-stream takes it. */
export type TarHeader = Partial<Header> & Pick<Header, 'name'>;
import { parseImageReference, type ImageReference } from '../../src/image/reference.ts';
import { createRegistryClient, MEDIA_TYPES, type RegistryHttpClient } from '../../src/registry/client.ts';
import type { Descriptor, Platform } from '../../src/registry/types.ts';
import { accessFor, type TestRegistry } from './registry.ts';

export type Compression = 'gzip' | 'zstd' | 'none';
export type MediaTypes = 'oci' | 'docker';

export type LayerEntry =
  /** A regular file. */
  | { readonly path: string; readonly content: Buffer | string; readonly mode?: number }
  | { readonly path: string; readonly type: 'directory'; readonly mode?: number }
  /** A symbolic link `path` → `linkTo`. */
  | { readonly path: string; readonly linkTo: string }
  /** A hard link `path` to the earlier entry `hardlinkTo`. */
  | { readonly path: string; readonly hardlinkTo: string }
  /** Deletes `whiteout` from lower layers: an empty `dir/.wh.name`. */
  | { readonly whiteout: string }
  /** Hides everything lower layers have in directory `opaque`: `dir/.wh..wh..opq`. */
  | { readonly opaque: string };

export interface LayerSpec {
  readonly entries: readonly LayerEntry[];
  /** Default gzip. */
  readonly compression?: Compression;
}

/** A layer given as its stored bytes, e.g. a malicious tar or a gzip bomb. */
export interface RawLayer {
  readonly data: Buffer;
  readonly compression: Compression;
  /** Digest of the uncompressed tar, for the config's `rootfs.diff_ids`; computed when omitted and possible. */
  readonly diffId?: string;
  /** Overrides the media type derived from `compression`. */
  readonly mediaType?: string;
}

export interface PushImageOptions {
  readonly layers: readonly (LayerSpec | RawLayer)[];
  /** Default linux/amd64. */
  readonly platform?: Platform;
  /** Default 'oci'. */
  readonly mediaTypes?: MediaTypes;
  /** Extra fields of the image config's `config` (Env, Labels, …). */
  readonly config?: Record<string, unknown>;
  /** A client to push with; one is created (and closed) per call otherwise. */
  readonly client?: RegistryHttpClient;
}

export interface PushedImage {
  /** The reference pushed, e.g. `127.0.0.1:5000/kmm/module:v1`. */
  readonly reference: string;
  readonly ref: ImageReference;
  /** Manifest digest. */
  readonly digest: string;
  readonly manifest: Buffer;
  readonly mediaType: string;
  /** The manifest as an index entry would reference it. */
  readonly descriptor: Descriptor;
  readonly config: Descriptor;
  readonly configBytes: Buffer;
  readonly layers: readonly Descriptor[];
  /** Stored (compressed) bytes of each layer. */
  readonly layerData: readonly Buffer[];
  readonly platform: Platform;
}

export function sha256(data: Buffer | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

const FIXED_MTIME = new Date('2024-01-01T00:00:00Z');

function dirname(path: string): string {
  const trimmed = path.replace(/\/+$/, '');
  const i = trimmed.lastIndexOf('/');
  return i === -1 ? '' : trimmed.slice(0, i + 1);
}
function basename(path: string): string {
  const trimmed = path.replace(/\/+$/, '');
  return trimmed.slice(trimmed.lastIndexOf('/') + 1);
}

/** An uncompressed tar of `entries`, in order, with fixed owners and times. */
export async function buildTar(entries: readonly LayerEntry[]): Promise<Buffer> {
  const headers = entries.map((e): { header: TarHeader; content?: Buffer } => {
    const base = { mtime: FIXED_MTIME, uid: 0, gid: 0, uname: 'root', gname: 'root' };
    if ('whiteout' in e) return { header: { ...base, name: `${dirname(e.whiteout)}.wh.${basename(e.whiteout)}`, type: 'file', mode: 0o644, size: 0 }, content: Buffer.alloc(0) };
    if ('opaque' in e) return { header: { ...base, name: `${e.opaque.replace(/\/+$/, '')}/.wh..wh..opq`, type: 'file', mode: 0o644, size: 0 }, content: Buffer.alloc(0) };
    if ('linkTo' in e) return { header: { ...base, name: e.path, type: 'symlink', linkname: e.linkTo, mode: 0o777 } };
    if ('hardlinkTo' in e) return { header: { ...base, name: e.path, type: 'link', linkname: e.hardlinkTo, mode: 0o644 } };
    if ('type' in e) return { header: { ...base, name: e.path, type: 'directory', mode: e.mode ?? 0o755 } };
    const content = Buffer.isBuffer(e.content) ? e.content : Buffer.from(e.content, 'utf8');
    return { header: { ...base, name: e.path, type: 'file', mode: e.mode ?? 0o644, size: content.length }, content };
  });
  return packTar(headers);
}

/**
 * A tar with headers exactly as given (names such as `../escape` or `/etc/passwd`, symlinks out
 * of the tree, odd types): for tests of hostile layers.
 */
export async function rawTar(entries: readonly { header: TarHeader; content?: Buffer | string }[]): Promise<Buffer> {
  return packTar(entries.map((e) => ({ header: e.header, ...(e.content !== undefined ? { content: Buffer.from(e.content) } : {}) })));
}

async function packTar(entries: readonly { header: TarHeader; content?: Buffer }[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const collected = (async () => {
    for await (const chunk of pack as AsyncIterable<Uint8Array>) chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
  })();
  for (const { header, content } of entries) {
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null) => (err ? reject(err) : resolve());
      if (content !== undefined) pack.entry({ ...header, size: content.length }, content, cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  await collected;
  return Buffer.concat(chunks);
}

export function compress(data: Buffer, compression: Compression): Buffer {
  switch (compression) {
    case 'gzip':
      return gzipSync(data);
    case 'zstd':
      return zstdCompressSync(data);
    case 'none':
      return data;
  }
}

export function layerMediaType(compression: Compression, mediaTypes: MediaTypes): string {
  if (mediaTypes === 'docker') {
    if (compression === 'gzip') return 'application/vnd.docker.image.rootfs.diff.tar.gzip';
    if (compression === 'none') return 'application/vnd.docker.image.rootfs.diff.tar';
    // Docker has no zstd type of its own; buildx writes the OCI one into Docker manifests too.
    return 'application/vnd.oci.image.layer.v1.tar+zstd';
  }
  return compression === 'none' ? 'application/vnd.oci.image.layer.v1.tar' : `application/vnd.oci.image.layer.v1.tar+${compression}`;
}

function resolveTarget(registry: TestRegistry, repoTag: string): ImageReference {
  return parseImageReference(`${registry.host}/${repoTag}`);
}

async function withClient<T>(client: RegistryHttpClient | undefined, fn: (c: RegistryHttpClient) => Promise<T>): Promise<T> {
  const c = client ?? createRegistryClient({ retries: 1, baseBackoffMs: 50 });
  try {
    return await fn(c);
  } finally {
    if (client === undefined) await c.close();
  }
}

/** Builds an image from `options.layers` and pushes it as `repoTag` (e.g. `kmm/module:v1`). */
export async function pushImage(registry: TestRegistry, repoTag: string, options: PushImageOptions): Promise<PushedImage> {
  const ref = resolveTarget(registry, repoTag);
  const mediaTypes = options.mediaTypes ?? 'oci';
  const platform = options.platform ?? { os: 'linux', architecture: 'amd64' };
  const access = accessFor(registry);

  const layerData: Buffer[] = [];
  const layers: Descriptor[] = [];
  const diffIds: string[] = [];
  for (const spec of options.layers) {
    let data: Buffer;
    let diffId: string;
    let mediaType: string;
    if ('data' in spec) {
      data = spec.data;
      diffId = spec.diffId ?? (spec.compression === 'none' ? sha256(data) : sha256(decompressForDiffId(data, spec.compression)));
      mediaType = spec.mediaType ?? layerMediaType(spec.compression, mediaTypes);
    } else {
      const tarBytes = await buildTar(spec.entries);
      const compression = spec.compression ?? 'gzip';
      data = compress(tarBytes, compression);
      diffId = sha256(tarBytes);
      mediaType = layerMediaType(compression, mediaTypes);
    }
    layerData.push(data);
    diffIds.push(diffId);
    layers.push({ mediaType, digest: sha256(data), size: data.length });
  }

  const configDoc = {
    created: FIXED_MTIME.toISOString(),
    architecture: platform.architecture,
    os: platform.os,
    ...(platform.variant !== undefined ? { variant: platform.variant } : {}),
    config: { ...(options.config ?? {}) },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: diffIds.map(() => ({ created: FIXED_MTIME.toISOString(), created_by: 'kmm-preflight test fixture' })),
  };
  const configBytes = Buffer.from(JSON.stringify(configDoc));
  const config: Descriptor = {
    mediaType: mediaTypes === 'docker' ? 'application/vnd.docker.container.image.v1+json' : 'application/vnd.oci.image.config.v1+json',
    digest: sha256(configBytes),
    size: configBytes.length,
  };
  const mediaType = mediaTypes === 'docker' ? MEDIA_TYPES.dockerManifest : MEDIA_TYPES.ociManifest;
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType, config, layers }, null, 2));

  const digest = await withClient(options.client, async (client) => {
    await client.pushBlob(ref, configBytes, config.digest, access);
    for (let i = 0; i < layers.length; i++) await client.pushBlob(ref, layerData[i]!, layers[i]!.digest, access);
    return client.pushManifest(ref, manifest, mediaType, access);
  });
  return {
    reference: ref.normalized,
    ref,
    digest,
    manifest,
    mediaType,
    descriptor: { mediaType, digest, size: manifest.length },
    config,
    configBytes,
    layers,
    layerData,
    platform,
  };
}

function decompressForDiffId(data: Buffer, compression: Compression): Buffer {
  // Only for small raw layers; large ones (bombs) come with their diffId.
  return compression === 'gzip' ? gunzipSync(data) : compression === 'zstd' ? zstdDecompressSync(data) : data;
}

export interface IndexEntrySpec {
  readonly platform: Platform;
  /** An image pushed to the same repository, or a descriptor of a manifest there. */
  readonly ref: PushedImage | Descriptor;
}

/**
 * Pushes an index (OCI image index or Docker manifest list) as `repoTag` over manifests already
 * in the same repository; returns the index digest.
 */
export async function pushIndex(
  registry: TestRegistry,
  repoTag: string,
  entries: readonly IndexEntrySpec[],
  options: { mediaTypes?: MediaTypes; client?: RegistryHttpClient } = {},
): Promise<{ digest: string; index: Buffer; mediaType: string; reference: string }> {
  const ref = resolveTarget(registry, repoTag);
  const mediaType = options.mediaTypes === 'docker' ? MEDIA_TYPES.dockerManifestList : MEDIA_TYPES.ociIndex;
  const manifests = entries.map((e) => {
    const d = 'descriptor' in e.ref ? e.ref.descriptor : e.ref;
    return { mediaType: d.mediaType, digest: d.digest, size: d.size, platform: e.platform };
  });
  const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType, manifests }, null, 2));
  const digest = await withClient(options.client, (client) => client.pushManifest(ref, index, mediaType, accessFor(registry)));
  return { digest, index, mediaType, reference: ref.normalized };
}

/**
 * A gzip-compressed tar holding one file of `uncompressedBytes` zeros (default 1 GiB): about a
 * thousandth of that compressed. Streamed through zlib; only the compressed bytes are held.
 */
export async function gzipBomb(options: { uncompressedBytes?: number; fileName?: string } = {}): Promise<{ data: Buffer; diffId: string; tarBytes: number }> {
  const size = options.uncompressedBytes ?? 1024 ** 3;
  const pack = tar.pack();
  const zeros = Buffer.alloc(1024 * 1024);
  const entry = pack.entry({ name: options.fileName ?? 'opt/lib/modules/zeros.ko', size, mode: 0o644, mtime: FIXED_MTIME, type: 'file' });
  const hash = createHash('sha256');
  let tarBytes = 0;
  const chunks: Buffer[] = [];
  const done = pipeline(
    Readable.from(pack as AsyncIterable<Uint8Array>),
    async function* (src: AsyncIterable<Buffer>) {
      for await (const raw of src) {
        const chunk = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
        hash.update(chunk);
        tarBytes += chunk.length;
        yield chunk;
      }
    },
    createGzip({ level: 9 }),
    async function (src: AsyncIterable<Buffer>) {
      for await (const chunk of src) chunks.push(chunk);
    },
  );
  // Written by hand with backpressure: the entry is a streamx stream, not a node one.
  for (let left = size; left > 0; left -= zeros.length) {
    if (!entry.write(left >= zeros.length ? zeros : zeros.subarray(0, left))) {
      await new Promise<void>((resolve) => entry.once('drain', () => resolve()));
    }
  }
  await new Promise<void>((resolve, reject) => {
    entry.once('error', reject);
    entry.end(() => resolve());
  });
  pack.finalize();
  await done;
  return { data: Buffer.concat(chunks), diffId: `sha256:${hash.digest('hex')}`, tarBytes };
}
