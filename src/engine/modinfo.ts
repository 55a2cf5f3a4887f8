/**
 * Reading what modprobe and the kernel read from a kernel module: the `.modinfo` section of the
 * ELF object (vermagic, name, depends, ...), after decompressing `.ko.xz`, `.ko.zst` or `.ko.gz`,
 * and the `modules.dep` file that `depmod` writes.
 *
 * Everything here works on bounded buffers: decompression refuses output over a limit before (xz,
 * from the LZMA2 chunk headers) or while (gzip, zstd) producing it.
 */
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import { xz } from '@napi-rs/lzma';

const gunzip = promisify(zlib.gunzip);
const zstdDecompress = promisify(zlib.zstdDecompress);

export class ModinfoError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ModinfoError';
  }
}

/** The appended module signature (`~Module signature appended~`), as `modinfo` reports it. */
export interface ModuleSignature {
  /** `PKCS#7`, `X509` or `PGP` (modinfo's `sig_id`). */
  readonly sigId: string;
  /** Signer name, in the pre-PKCS#7 format only (PKCS#7 keeps it inside the signature). */
  readonly signer?: string;
  /** Key id as hex, in the pre-PKCS#7 format only. */
  readonly keyId?: string;
  readonly sigLength: number;
}

export interface ModuleInfo {
  readonly vermagic?: string;
  readonly name?: string;
  /** `depends=` split on commas; empty when the field is empty or absent. */
  readonly depends: readonly string[];
  readonly srcversion?: string;
  readonly license?: string;
  /** `signer=`/`sig_id=` when present in `.modinfo` (some build systems add them there). */
  readonly signer?: string;
  readonly sigId?: string;
  readonly signature?: ModuleSignature;
  readonly elf: { readonly class: 32 | 64; readonly endian: 'le' | 'be'; readonly machine: number };
}

export type ModuleCompression = 'none' | 'xz' | 'zst' | 'gz';

const MODULE_FILE_RE = /\.ko(?:\.(xz|zst|gz))?$/;

/** The compression of a module file by its name, or undefined when the name is not a module's. */
export function moduleCompression(fileName: string): ModuleCompression | undefined {
  const m = MODULE_FILE_RE.exec(fileName);
  if (!m) return undefined;
  return (m[1] as ModuleCompression | undefined) ?? 'none';
}

/** Whether a path's base name is a kernel module's (`x.ko`, `x.ko.xz`, `x.ko.zst`, `x.ko.gz`). */
export function isModuleFileName(path: string): boolean {
  const base = path.slice(path.lastIndexOf('/') + 1);
  return base.length > 3 && moduleCompression(base) !== undefined && !base.startsWith('.ko');
}

/** A module name as modprobe compares it: `-` and `_` are the same. */
export function normalizeModuleName(name: string): string {
  return name.replaceAll('-', '_');
}

/** The module name of a module file path: base name without `.ko[.xz|.zst|.gz]`, normalised. */
export function moduleNameFromPath(path: string): string {
  const base = path.slice(path.lastIndexOf('/') + 1);
  return normalizeModuleName(base.replace(MODULE_FILE_RE, ''));
}

// ---------------------------------------------------------------------------------------------
// Decompression

/**
 * The exact decompressed size of an `.xz` file, from its block and LZMA2 chunk headers, without
 * decompressing (each LZMA2 chunk states its unpacked size and decoders produce exactly that).
 * @throws ModinfoError when the file is not a well-formed xz file.
 */
export function xzDecompressedSize(buf: Buffer): number {
  const fail = (what: string): never => {
    throw new ModinfoError(`not a valid xz file: ${what}`);
  };
  const CHECK_SIZES = [0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64];
  const MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
  let pos = 0;
  let total = 0;
  const readVarint = (): number => {
    let value = 0;
    for (let i = 0; i < 9; i++) {
      if (pos >= buf.length) fail('truncated number');
      const b = buf[pos++]!;
      value += (b & 0x7f) * 2 ** (7 * i);
      if ((b & 0x80) === 0) return value;
    }
    return fail('number too long');
  };
  let streams = 0;
  while (pos < buf.length) {
    // Stream padding between streams: zero bytes, a multiple of four.
    if (streams > 0 && buf[pos] === 0) {
      pos++;
      continue;
    }
    if (pos + 12 > buf.length || !buf.subarray(pos, pos + 6).equals(MAGIC)) fail('bad stream header');
    const checkSize = CHECK_SIZES[buf[pos + 7]! & 0x0f]!;
    pos += 12;
    streams++;
    // Blocks until the index indicator (a zero byte).
    for (;;) {
      if (pos >= buf.length) fail('truncated block');
      const sizeByte = buf[pos]!;
      if (sizeByte === 0) break;
      const blockStart = pos;
      const headerSize = (sizeByte + 1) * 4;
      if (pos + headerSize > buf.length) fail('truncated block header');
      const flags = buf[pos + 1]!;
      const filters = (flags & 0x03) + 1;
      pos += 2;
      if (flags & 0x40) readVarint();
      if (flags & 0x80) readVarint();
      let lastFilter = -1;
      for (let f = 0; f < filters; f++) {
        lastFilter = readVarint();
        const propsSize = readVarint();
        pos += propsSize;
      }
      if (lastFilter !== 0x21) fail('the last filter is not LZMA2');
      pos = blockStart + headerSize;
      // LZMA2 chunks.
      for (;;) {
        if (pos >= buf.length) fail('truncated LZMA2 data');
        const c = buf[pos]!;
        if (c === 0x00) {
          pos++;
          break;
        }
        if (c === 0x01 || c === 0x02) {
          if (pos + 3 > buf.length) fail('truncated LZMA2 chunk');
          const size = buf.readUInt16BE(pos + 1) + 1;
          total += size;
          pos += 3 + size;
        } else if (c >= 0x80) {
          if (pos + 5 > buf.length) fail('truncated LZMA2 chunk');
          const unpacked = (c & 0x1f) * 65536 + buf.readUInt16BE(pos + 1) + 1;
          const packed = buf.readUInt16BE(pos + 3) + 1;
          const props = ((c >> 5) & 3) >= 2 ? 1 : 0;
          total += unpacked;
          pos += 5 + props + packed;
        } else {
          fail(`bad LZMA2 control byte 0x${c.toString(16)}`);
        }
      }
      // Block padding to a multiple of four, then the check.
      while ((pos - blockStart) % 4 !== 0) pos++;
      pos += checkSize;
    }
    // Index: indicator, record count, records, padding, CRC32.
    const indexStart = pos;
    pos++;
    const records = readVarint();
    for (let r = 0; r < records; r++) {
      readVarint();
      readVarint();
    }
    while ((pos - indexStart) % 4 !== 0) pos++;
    pos += 4;
    // Stream footer.
    if (pos + 12 > buf.length || buf[pos + 10] !== 0x59 || buf[pos + 11] !== 0x5a) fail('bad stream footer');
    pos += 12;
  }
  if (streams === 0) fail('empty');
  return total;
}

/**
 * Decompresses a module file's content. Refuses output over `maxBytes` (a decompression bomb
 * inside an image must not exhaust memory).
 * @throws ModinfoError
 */
export async function decompressModule(data: Buffer, compression: ModuleCompression, maxBytes: number): Promise<Buffer> {
  const tooLarge = (): ModinfoError => new ModinfoError(`it decompresses to more than ${formatBytes(maxBytes)}`);
  try {
    switch (compression) {
      case 'none':
        return data;
      case 'xz': {
        const size = xzDecompressedSize(data);
        if (size > maxBytes) throw tooLarge();
        return await xz.decompress(data);
      }
      case 'zst':
        return await zstdDecompress(data, { maxOutputLength: maxBytes });
      case 'gz':
        return await gunzip(data, { maxOutputLength: maxBytes });
    }
  } catch (err) {
    if (err instanceof ModinfoError) throw err;
    if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') throw tooLarge();
    throw new ModinfoError(`it is not a valid ${compression} file: ${(err as Error).message}`, { cause: err });
  }
}

// ---------------------------------------------------------------------------------------------
// ELF

const SIGNATURE_MAGIC = Buffer.from('~Module signature appended~\n');
const SIG_ID_TYPES = ['PGP', 'X509', 'PKCS#7'];

function readSignature(buf: Buffer): ModuleSignature | undefined {
  if (buf.length < SIGNATURE_MAGIC.length + 12) return undefined;
  if (!buf.subarray(buf.length - SIGNATURE_MAGIC.length).equals(SIGNATURE_MAGIC)) return undefined;
  const info = buf.length - SIGNATURE_MAGIC.length - 12;
  const idType = buf[info + 2]!;
  const signerLen = buf[info + 3]!;
  const keyIdLen = buf[info + 4]!;
  const sigLength = buf.readUInt32BE(info + 8);
  const sigId = SIG_ID_TYPES[idType] ?? `unknown(${idType})`;
  if (idType === 2 || signerLen + keyIdLen + sigLength > info) return { sigId, sigLength };
  const sigStart = info - sigLength;
  const keyId = buf.subarray(sigStart - keyIdLen, sigStart).toString('hex');
  const signer = buf.subarray(sigStart - keyIdLen - signerLen, sigStart - keyIdLen).toString('utf8');
  return { sigId, sigLength, ...(signer ? { signer } : {}), ...(keyId ? { keyId } : {}) };
}

/**
 * Parses the `.modinfo` section of an ELF relocatable object (32 or 64-bit, either byte order).
 * @throws ModinfoError when the data is not ELF or has no `.modinfo` section.
 */
export function parseModinfo(buf: Buffer): ModuleInfo {
  if (buf.length < 52 || buf[0] !== 0x7f || buf[1] !== 0x45 || buf[2] !== 0x4c || buf[3] !== 0x46) {
    throw new ModinfoError('it is not an ELF file');
  }
  const cls = buf[4] === 1 ? 32 : buf[4] === 2 ? 64 : undefined;
  const endian = buf[5] === 1 ? 'le' : buf[5] === 2 ? 'be' : undefined;
  if (!cls || !endian) throw new ModinfoError(`unknown ELF class ${buf[4]} or data encoding ${buf[5]}`);
  const le = endian === 'le';
  const bounds = (off: number, len: number): void => {
    if (!Number.isSafeInteger(off) || off < 0 || len < 0 || off + len > buf.length) {
      throw new ModinfoError('it is a truncated or malformed ELF file');
    }
  };
  const u16 = (off: number): number => (bounds(off, 2), le ? buf.readUInt16LE(off) : buf.readUInt16BE(off));
  const u32 = (off: number): number => (bounds(off, 4), le ? buf.readUInt32LE(off) : buf.readUInt32BE(off));
  const u64 = (off: number): number => {
    bounds(off, 8);
    const v = le ? buf.readBigUInt64LE(off) : buf.readBigUInt64BE(off);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ModinfoError('it is a malformed ELF file (offset out of range)');
    return Number(v);
  };
  const word = cls === 64 ? u64 : u32;
  if (cls === 64 && buf.length < 64) throw new ModinfoError('it is a truncated ELF file');
  const machine = u16(18);
  const shoff = cls === 64 ? u64(0x28) : u32(0x20);
  const shentsize = u16(cls === 64 ? 0x3a : 0x2e);
  let shnum = u16(cls === 64 ? 0x3c : 0x30);
  let shstrndx = u16(cls === 64 ? 0x3e : 0x32);
  const minEntSize = cls === 64 ? 64 : 40;
  if (shoff === 0) throw new ModinfoError('it has no section headers');
  if (shentsize < minEntSize) throw new ModinfoError('it is a malformed ELF file (section header size)');
  // Field offsets inside a section header.
  const F = cls === 64 ? { type: 4, offset: 24, size: 32, link: 40 } : { type: 4, offset: 16, size: 20, link: 24 };
  const header = (i: number): number => shoff + i * shentsize;
  if (shnum === 0) shnum = word(header(0) + F.size); // extended numbering
  if (shstrndx === 0xffff) shstrndx = u32(header(0) + F.link);
  if (shnum > 1_000_000) throw new ModinfoError('it is a malformed ELF file (too many sections)');
  bounds(shoff, shnum * shentsize);
  if (shstrndx >= shnum) throw new ModinfoError('it is a malformed ELF file (section name table index)');
  const strOff = word(header(shstrndx) + F.offset);
  const strSize = word(header(shstrndx) + F.size);
  bounds(strOff, strSize);
  const nameAt = (off: number): string => {
    if (off >= strSize) return '';
    const start = strOff + off;
    const end = buf.indexOf(0, start);
    return buf.toString('latin1', start, end === -1 || end > strOff + strSize ? strOff + strSize : end);
  };
  let modinfo: Buffer | undefined;
  for (let i = 0; i < shnum; i++) {
    const h = header(i);
    if (nameAt(u32(h)) !== '.modinfo') continue;
    if (u32(h + F.type) === 8 /* SHT_NOBITS */) break;
    const off = word(h + F.offset);
    const size = word(h + F.size);
    bounds(off, size);
    modinfo = buf.subarray(off, off + size);
    break;
  }
  if (!modinfo) throw new ModinfoError('it has no .modinfo section');
  const fields = new Map<string, string>();
  for (const part of modinfo.toString('utf8').split('\0')) {
    const eq = part.indexOf('=');
    if (eq <= 0) continue;
    const key = part.slice(0, eq);
    // modinfo prints repeated keys (alias=, parm=) one per line; the fields used here are single.
    if (!fields.has(key)) fields.set(key, part.slice(eq + 1));
  }
  const depends = fields.get('depends');
  const signature = readSignature(buf);
  const pick = (key: string, as: string): Record<string, string> => {
    const v = fields.get(key);
    return v === undefined ? {} : { [as]: v };
  };
  return {
    ...pick('vermagic', 'vermagic'),
    ...pick('name', 'name'),
    depends: depends ? depends.split(',').filter((d) => d.length > 0) : [],
    ...pick('srcversion', 'srcversion'),
    ...pick('license', 'license'),
    ...pick('signer', 'signer'),
    ...pick('sig_id', 'sigId'),
    ...(signature ? { signature } : {}),
    elf: { class: cls, endian, machine },
  };
}

/**
 * Reads the module information of a module file's content, decompressing by the file name.
 * @throws ModinfoError
 */
export async function readModuleInfo(data: Buffer, fileName: string, maxBytes: number): Promise<ModuleInfo> {
  const compression = moduleCompression(fileName) ?? 'none';
  return parseModinfo(await decompressModule(data, compression, maxBytes));
}

// ---------------------------------------------------------------------------------------------
// modules.dep

/**
 * A parsed `modules.dep`: module path (as written, normally relative to the kernel directory,
 * e.g. `kernel/drivers/gpu/x.ko.xz` or `extra/gpu.ko`) → paths of its dependencies.
 */
export interface ModulesDep {
  readonly modules: Readonly<Record<string, readonly string[]>>;
  /** Lines that are not `path: deps` (counted, not fatal: modprobe skips them too). */
  readonly malformedLines: number;
}

export function parseModulesDep(text: string): ModulesDep {
  const modules: Record<string, string[]> = Object.create(null) as Record<string, string[]>;
  let malformedLines = 0;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const colon = line.indexOf(':');
    if (colon <= 0) {
      malformedLines++;
      continue;
    }
    const path = line.slice(0, colon).trim();
    const deps = line
      .slice(colon + 1)
      .split(/\s+/)
      .filter((d) => d.length > 0);
    modules[path] = deps;
  }
  return { modules, malformedLines };
}

/**
 * Finds a module in a parsed `modules.dep` by name (`-`/`_` equal). `kernelDir` (e.g.
 * `/lib/modules/6.1.0-18-amd64`) strips the prefix of absolute paths written by old depmods.
 * Returns the path relative to the kernel directory, or undefined.
 */
export function findInModulesDep(dep: ModulesDep, moduleName: string, kernelDir?: string): string | undefined {
  const wanted = normalizeModuleName(moduleName);
  for (const path of Object.keys(dep.modules)) {
    if (moduleNameFromPath(path) !== wanted) continue;
    return relativeToKernelDir(path, kernelDir);
  }
  return undefined;
}

/** A modules.dep path relative to the kernel directory. */
export function relativeToKernelDir(path: string, kernelDir?: string): string {
  if (!path.startsWith('/')) return path;
  if (kernelDir) {
    const prefix = kernelDir.endsWith('/') ? kernelDir : `${kernelDir}/`;
    if (path.startsWith(prefix)) return path.slice(prefix.length);
  }
  // /lib/modules/<kernel>/rest → rest
  const m = /\/lib\/modules\/[^/]+\/(.*)$/.exec(path);
  return m?.[1] ?? path.replace(/^\/+/, '');
}

export function formatBytes(n: number): string {
  if (n >= 1024 ** 3 && n % 1024 ** 3 === 0) return `${n / 1024 ** 3} GiB`;
  if (n >= 1024 ** 2 && n % 1024 ** 2 === 0) return `${n / 1024 ** 2} MiB`;
  if (n >= 1024 && n % 1024 === 0) return `${n / 1024} KiB`;
  return `${n} bytes`;
}
