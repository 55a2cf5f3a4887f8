/**
 * Fixtures for the Image stage tests:
 *
 * - real kernel-module-like ELF objects: a C file whose `.modinfo` section holds `vermagic=`,
 *   `name=`, `depends=` (as the kernel's `MODULE_INFO` macros emit them), compiled with `gcc -c`
 *   at test time; xz (the `xz` tool with the kernel's options), zstd and gzip variants; and a
 *   hand-written ELF writer for the byte orders gcc here cannot produce;
 * - image layers built in memory with tar-stream (gzip, zstd or plain);
 * - {@link FakeRegistry}, a hand-written {@link RegistryClient} serving those layers, counting the
 *   bytes it serves and the blobs it opens, verifying digests like the real client.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import { pack, type Header } from 'tar-stream';
import type { ImageReference } from '../../src/image/reference.ts';
import {
  RegistryError,
  type Descriptor,
  type Platform,
  type RegistryAccess,
  type RegistryClient,
  type RegistryErrorCode,
  type RequestOptions,
  type ResolvedImage,
} from '../../src/registry/types.ts';
import { ensureDebianBinary } from './debian.ts';

const run = promisify(execFile);

// ---------------------------------------------------------------------------------------------
// Module objects

export interface ModuleSpec {
  readonly name: string;
  readonly vermagic: string;
  readonly depends?: readonly string[];
  /** More `key=value` entries (srcversion, license, signer, ...). */
  readonly extra?: Readonly<Record<string, string>>;
  /** 32-bit object (`gcc -m32`); default 64. */
  readonly bits?: 32 | 64;
}

let gccChecked: Promise<void> | undefined;

/** Fails with "install gcc" when gcc is missing: the module fixtures are compiled at test time. */
export function requireGcc(): Promise<void> {
  gccChecked ??= run('gcc', ['--version']).then(
    () => undefined,
    (err: unknown) => {
      throw new Error(`gcc is needed to build kernel module fixtures: install gcc (apt-get install gcc): ${(err as Error).message}`);
    },
  );
  return gccChecked;
}

function cString(s: string): string {
  return JSON.stringify(s); // a JSON string of printable characters is a valid C string literal
}

const built = new Map<string, Promise<Buffer>>();

/**
 * Compiles a relocatable ELF object whose `.modinfo` section holds the spec's fields, as a kernel
 * module's does (the `__UNIQUE_ID_*` arrays of `MODULE_INFO`).
 */
export function buildModuleObject(spec: ModuleSpec): Promise<Buffer> {
  const key = JSON.stringify(spec);
  let p = built.get(key);
  if (!p) {
    p = compile(spec);
    built.set(key, p);
  }
  return p;
}

async function compile(spec: ModuleSpec): Promise<Buffer> {
  await requireGcc();
  const fields: [string, string][] = [
    ['vermagic', spec.vermagic],
    ['name', spec.name],
    ['depends', (spec.depends ?? []).join(',')],
    ...Object.entries(spec.extra ?? {}),
  ];
  const source = [
    '/* kernel-module-like object for kmm-preflight tests */',
    'int init_module(void) { return 0; }',
    ...fields.map(
      ([k, v], i) =>
        `static const char __UNIQUE_ID_${k.replace(/\W/g, '_')}${i}[] __attribute__((section(".modinfo"), used, aligned(1))) = ${cString(`${k}=${v}`)};`,
    ),
    '',
  ].join('\n');
  const dir = await mkdtemp(join(tmpdir(), 'kmod-fixture-'));
  try {
    await writeFile(join(dir, 'm.c'), source);
    const args = ['-c', '-O0', '-o', join(dir, 'm.ko'), join(dir, 'm.c')];
    if (spec.bits === 32) args.unshift('-m32');
    await run('gcc', args);
    return await readFile(join(dir, 'm.ko'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export type ModuleCompression = 'xz' | 'zst' | 'gz';

/** Compresses a module as kbuild does (`xz --check=crc32 --lzma2=dict=1MiB`, `zstd`, `gzip`). */
export async function compressModule(data: Buffer, compression: ModuleCompression): Promise<Buffer> {
  switch (compression) {
    case 'xz': {
      const xz = await ensureDebianBinary('xz', 'xz-utils');
      const dir = await mkdtemp(join(tmpdir(), 'kmod-xz-'));
      try {
        await writeFile(join(dir, 'm.ko'), data);
        await run(xz, ['--check=crc32', '--lzma2=dict=1MiB', '-f', join(dir, 'm.ko')]);
        return await readFile(join(dir, 'm.ko.xz'));
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }
    case 'zst':
      return zlib.zstdCompressSync(data);
    case 'gz':
      return zlib.gzipSync(data);
  }
}

export async function buildModuleXz(spec: ModuleSpec): Promise<Buffer> {
  return compressModule(await buildModuleObject(spec), 'xz');
}
export async function buildModuleZst(spec: ModuleSpec): Promise<Buffer> {
  return compressModule(await buildModuleObject(spec), 'zst');
}
export async function buildModuleGz(spec: ModuleSpec): Promise<Buffer> {
  return compressModule(await buildModuleObject(spec), 'gz');
}

/**
 * A minimal ELF relocatable object written by hand: null section, `.modinfo`, `.shstrtab`. For the
 * byte orders and classes the local gcc cannot produce (big-endian).
 */
export function buildElf(options: { bits: 32 | 64; endian: 'le' | 'be'; modinfo: readonly string[]; machine?: number }): Buffer {
  const { bits, endian } = options;
  const le = endian === 'le';
  const ehsize = bits === 64 ? 64 : 52;
  const shentsize = bits === 64 ? 64 : 40;
  const modinfo = Buffer.from(options.modinfo.map((f) => `${f}\0`).join(''));
  const shstrtab = Buffer.from('\0.modinfo\0.shstrtab\0');
  const modinfoOff = ehsize;
  const shstrOff = modinfoOff + modinfo.length;
  let shoff = shstrOff + shstrtab.length;
  shoff += (8 - (shoff % 8)) % 8;
  const total = shoff + 3 * shentsize;
  const b = Buffer.alloc(total);
  const u16 = (v: number, o: number): number => (le ? b.writeUInt16LE(v, o) : b.writeUInt16BE(v, o));
  const u32 = (v: number, o: number): number => (le ? b.writeUInt32LE(v, o) : b.writeUInt32BE(v, o));
  const word = (v: number, o: number): number =>
    bits === 64 ? (le ? b.writeBigUInt64LE(BigInt(v), o) : b.writeBigUInt64BE(BigInt(v), o)) : u32(v, o);
  b.set([0x7f, 0x45, 0x4c, 0x46, bits === 64 ? 2 : 1, le ? 1 : 2, 1], 0);
  u16(1, 16); // ET_REL
  u16(options.machine ?? (bits === 64 ? 43 : 2), 18); // SPARC v9 / SPARC: big-endian machines
  u32(1, 20);
  if (bits === 64) {
    word(shoff, 0x28);
    u16(ehsize, 0x34);
    u16(shentsize, 0x3a);
    u16(3, 0x3c);
    u16(2, 0x3e);
  } else {
    u32(shoff, 0x20);
    u16(ehsize, 0x28);
    u16(shentsize, 0x2e);
    u16(3, 0x30);
    u16(2, 0x32);
  }
  modinfo.copy(b, modinfoOff);
  shstrtab.copy(b, shstrOff);
  const section = (i: number, name: number, type: number, offset: number, size: number): void => {
    const h = shoff + i * shentsize;
    u32(name, h);
    u32(type, h + 4);
    if (bits === 64) {
      word(offset, h + 24);
      word(size, h + 32);
      word(1, h + 48);
    } else {
      u32(offset, h + 16);
      u32(size, h + 20);
      u32(1, h + 32);
    }
  };
  section(1, 1, 1 /* PROGBITS */, modinfoOff, modinfo.length);
  section(2, 10, 3 /* STRTAB */, shstrOff, shstrtab.length);
  return b;
}

/**
 * Appends a module signature trailer in the pre-PKCS#7 layout (signer and key id before the
 * signature), as `modinfo` reads it: `signer`, `sig_key`, `sig_id`.
 */
export function appendLegacySignature(module: Buffer, signer: string, keyId: Buffer, signature: Buffer): Buffer {
  const info = Buffer.alloc(12);
  info[0] = 1; // RSA
  info[1] = 4; // sha256
  info[2] = 1; // X509
  info[3] = Buffer.byteLength(signer);
  info[4] = keyId.length;
  info.writeUInt32BE(signature.length, 8);
  return Buffer.concat([module, Buffer.from(signer), keyId, signature, info, Buffer.from('~Module signature appended~\n')]);
}

/** Writes `data` to a temporary file named `name` (for `modinfo`); returns its path. */
export async function writeTemp(name: string, data: Buffer): Promise<{ path: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'kmod-file-'));
  const path = join(dir, name);
  await writeFile(path, data);
  return { path, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** `modinfo -F field file` from Debian's kmod. */
export async function kmodModinfo(field: string, file: string): Promise<string> {
  const modinfo = await ensureDebianBinary('modinfo', 'kmod');
  const { stdout } = await run(modinfo, ['-F', field, file]);
  return stdout.trimEnd();
}

// ---------------------------------------------------------------------------------------------
// Layers

export type FileSpec =
  | { readonly path: string; readonly content: Buffer | string; readonly mode?: number }
  | { readonly path: string; readonly type: 'dir' }
  | { readonly path: string; readonly type: 'symlink'; readonly target: string }
  | { readonly path: string; readonly type: 'link'; readonly target: string };

export type LayerCompression = 'gzip' | 'zstd' | 'none';

export function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** A tar of the given entries, in order, names exactly as given (`../x` included). */
export async function buildTar(files: readonly FileSpec[]): Promise<Buffer> {
  const p = pack();
  const chunks: Buffer[] = [];
  const collected = (async () => {
    for await (const c of p) chunks.push(c as Buffer);
  })();
  for (const f of files) {
    let header: Partial<Header> & { name: string };
    let body: Buffer | undefined;
    if ('content' in f) {
      body = Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content);
      header = { name: f.path, type: 'file', mode: f.mode ?? 0o644, size: body.length };
    } else if (f.type === 'dir') {
      header = { name: f.path, type: 'directory', mode: 0o755 };
    } else if (f.type === 'symlink') {
      header = { name: f.path, type: 'symlink', linkname: f.target, mode: 0o777 };
    } else {
      header = { name: f.path, type: 'link', linkname: f.target, mode: 0o644 };
    }
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (body) p.entry(header, body, cb);
      else p.entry(header, cb);
    });
  }
  p.finalize();
  await collected;
  return Buffer.concat(chunks);
}

export function compressLayer(tar: Buffer, compression: LayerCompression): Buffer {
  switch (compression) {
    case 'gzip':
      return zlib.gzipSync(tar);
    case 'zstd':
      return zlib.zstdCompressSync(tar);
    case 'none':
      return tar;
  }
}

export interface Blob {
  readonly descriptor: Descriptor;
  /** The bytes served; when absent, `stream()` makes them. */
  readonly data?: Buffer;
  readonly stream?: () => Readable;
}

const LAYER_MEDIA_TYPES: Record<LayerCompression, string> = {
  gzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  zstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  none: 'application/vnd.oci.image.layer.v1.tar',
};

export async function buildLayer(files: readonly FileSpec[], compression: LayerCompression = 'gzip'): Promise<Blob> {
  const data = compressLayer(await buildTar(files), compression);
  return { data, descriptor: { mediaType: LAYER_MEDIA_TYPES[compression], digest: sha256(data), size: data.length } };
}

/**
 * A gzip bomb served as a stream: `members` concatenated gzip members, each the compression of
 * `memberBytes` zero bytes — a valid multi-member gzip of a tar holding one huge file. Only one
 * compressed member (a few KiB) is ever held in memory.
 */
export function gzipBombBlob(options: { uncompressedBytes: number; memberBytes?: number }): Blob {
  const memberBytes = options.memberBytes ?? 16 * 1024 * 1024;
  const members = Math.ceil(options.uncompressedBytes / memberBytes);
  const fileSize = members * memberBytes - 512;
  // First member: a tar header for one file of fileSize bytes, then zeros.
  const header = Buffer.alloc(512);
  header.write('bomb/zeros', 0);
  header.write('0000644\0', 100);
  header.write('0000000\0', 108);
  header.write('0000000\0', 116);
  header.write(`${fileSize.toString(8).padStart(11, '0')}\0`, 124);
  header.write('00000000000\0', 136);
  header.write('0', 156);
  header.write('ustar\0', 257);
  header.write('00', 263);
  header.fill(' ', 148, 156);
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
  const first = zlib.gzipSync(Buffer.concat([header, Buffer.alloc(memberBytes - 512)]), { level: 9 });
  const rest = zlib.gzipSync(Buffer.alloc(memberBytes), { level: 9 });
  const size = first.length + (members - 1) * rest.length;
  const hash = createHash('sha256').update(first);
  for (let i = 1; i < members; i++) hash.update(rest);
  const digest = `sha256:${hash.digest('hex')}`;
  return {
    descriptor: { mediaType: LAYER_MEDIA_TYPES.gzip, digest, size },
    stream: () =>
      Readable.from(
        (function* () {
          yield first;
          for (let i = 1; i < members; i++) yield rest;
        })(),
        { objectMode: false },
      ),
  };
}

// ---------------------------------------------------------------------------------------------
// Fake registry

export interface FakeImage {
  /** Layers bottom first, as in a manifest. */
  readonly layers: readonly Blob[];
  readonly error?: RegistryErrorCode;
}

export interface BlobBehaviour {
  /** Error thrown by openBlob. */
  readonly openError?: RegistryErrorCode;
  /** Serve these bytes instead (the stream then fails its digest check at the end). */
  readonly corruptWith?: Buffer;
  /** Pause between chunks (to keep a download in flight). */
  readonly chunkDelayMs?: number;
  /** Chunk size served (default 64 KiB). */
  readonly chunkSize?: number;
}

/**
 * A {@link RegistryClient} serving images from memory. Counts bytes served (`bytesReceived`), the
 * blobs opened (`opened`, by digest), the streams destroyed before their end (`destroyed`) and
 * the blobs read to the end (`completed`).
 */
export class FakeRegistry implements RegistryClient {
  readonly images = new Map<string, FakeImage>();
  readonly behaviours = new Map<string, BlobBehaviour>();
  readonly opened: string[] = [];
  readonly completed: string[] = [];
  readonly destroyed: string[] = [];
  resolveCalls = 0;
  private received = 0;

  get bytesReceived(): number {
    return this.received;
  }

  /** Registers an image under `repo:tag` as the stage will normalise it (e.g. `registry.test/x/y:1`). */
  addImage(reference: string, image: FakeImage): void {
    this.images.set(reference, image);
  }

  resetCounters(): void {
    this.opened.length = 0;
    this.completed.length = 0;
    this.destroyed.length = 0;
    this.received = 0;
    this.resolveCalls = 0;
  }

  async resolveImage(ref: ImageReference, _access: RegistryAccess, platform: Platform, options?: RequestOptions): Promise<ResolvedImage> {
    options?.signal?.throwIfAborted();
    this.resolveCalls++;
    const image = this.images.get(ref.normalized) ?? this.images.get(`${ref.domain}/${ref.path}:${ref.tag ?? 'latest'}`);
    if (!image) throw new RegistryError('NotFound', ref.domain, `manifest unknown: ${ref.normalized}`);
    if (image.error) throw new RegistryError(image.error, ref.domain, `${image.error} for ${ref.normalized}`);
    const config = Buffer.from(JSON.stringify({ architecture: platform.architecture, os: platform.os }));
    return {
      reference: ref,
      digest: sha256(Buffer.from(JSON.stringify(image.layers.map((l) => l.descriptor.digest)))),
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(config), size: config.length },
      layers: image.layers.map((l) => l.descriptor),
      platform,
    };
  }

  async openBlob(ref: ImageReference, descriptor: Descriptor, _access: RegistryAccess, options?: RequestOptions): Promise<Readable> {
    options?.signal?.throwIfAborted();
    const behaviour = this.behaviours.get(descriptor.digest) ?? {};
    if (behaviour.openError) throw new RegistryError(behaviour.openError, ref.domain, `${behaviour.openError}: blob ${descriptor.digest}`);
    let blob: Blob | undefined;
    for (const image of this.images.values()) {
      blob = image.layers.find((l) => l.descriptor.digest === descriptor.digest);
      if (blob) break;
    }
    if (!blob) throw new RegistryError('NotFound', ref.domain, `blob unknown: ${descriptor.digest}`);
    this.opened.push(descriptor.digest);
    const self = this;
    const chunkSize = behaviour.chunkSize ?? 64 * 1024;
    const source: AsyncIterable<Buffer> | Iterable<Buffer> = behaviour.corruptWith
      ? [behaviour.corruptWith]
      : blob.data
        ? [blob.data]
        : blob.stream!();
    const signal = options?.signal;
    let ended = false;
    const generator = async function* (): AsyncGenerator<Buffer> {
      const hash = createHash('sha256');
      let size = 0;
      for await (const big of source) {
        for (let off = 0; off < big.length; off += chunkSize) {
          signal?.throwIfAborted();
          if (behaviour.chunkDelayMs) await new Promise((r) => setTimeout(r, behaviour.chunkDelayMs));
          const chunk = big.subarray(off, off + chunkSize);
          hash.update(chunk);
          size += chunk.length;
          self.received += chunk.length;
          if (size > descriptor.size) throw new RegistryError('TooLarge', ref.domain, `blob ${descriptor.digest} is larger than ${descriptor.size} bytes`);
          yield chunk;
        }
      }
      const actual = `sha256:${hash.digest('hex')}`;
      if (actual !== descriptor.digest) {
        throw new RegistryError('DigestMismatch', ref.domain, `blob ${descriptor.digest} has digest ${actual}`);
      }
      ended = true;
      self.completed.push(descriptor.digest);
    };
    const stream = Readable.from(generator(), { objectMode: false, highWaterMark: chunkSize });
    stream.on('close', () => {
      if (!ended) self.destroyed.push(descriptor.digest);
    });
    signal?.addEventListener('abort', () => stream.destroy(signal.reason as Error), { once: true });
    return stream;
  }
}
