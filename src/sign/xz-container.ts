/**
 * An `.xz` file as the kernel's `scripts/Makefile.modinst` asks for one (`xz --check=crc32
 * --lzma2=dict=1MiB`): one stream, CRC32 check, one block with the LZMA2 filter and a 1 MiB
 * dictionary, an index and a footer. The kernel's in-kernel decompressor (`CONFIG_MODULE_DECOMPRESS`)
 * supports only the CRC32 check, and kmod and xz-utils read the same file.
 *
 * The LZMA2 data is written as *uncompressed* chunks: `@napi-rs/lzma` at the version this project
 * pins (1.4.5, backed by lzma-rs) has no LZMA2 encoder that takes a dictionary size, and its own
 * `xz.compress` stores too (check None, an 8 MiB dictionary). The file is therefore as large as
 * the module (plus 0.005 %) but valid everywhere `.ko.xz` is read. See docs/adr/0010.
 */
import { crc32 } from 'node:zlib';
import { setImmediate as yieldToLoop } from 'node:timers/promises';

const MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const CHECK_CRC32 = 0x01;
const LZMA2_FILTER_ID = 0x21;
/** LZMA2 dictionary-size property: size = (2 | (p & 1)) << (p / 2 + 11); 16 → 1 MiB. */
const DICT_1MIB = 16;
/** The largest uncompressed LZMA2 chunk. */
const CHUNK = 64 * 1024;
/** CRC work done between two turns of the event loop. */
const SLICE = 1024 * 1024;

function u32le(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

function varint(n: number): number[] {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return out;
}

const padTo4 = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);

/**
 * `data` as an `.xz` file (CRC32 check, LZMA2 with a 1 MiB dictionary, stored chunks). Yields to
 * the event loop every MiB; `signal` aborts between slices.
 */
export async function xzStore(data: Buffer, signal?: AbortSignal): Promise<Buffer> {
  signal?.throwIfAborted();
  const flags = Buffer.from([0x00, CHECK_CRC32]);
  const streamHeader = Buffer.concat([MAGIC, flags, u32le(crc32(flags))]);

  // Block header: size byte, flags (one filter, no sizes), filter flags, padding, CRC32.
  const filter = Buffer.from([LZMA2_FILTER_ID, 0x01, DICT_1MIB]);
  const headerLen = 2 + filter.length;
  const headerPadded = headerLen + ((4 - (headerLen % 4)) % 4);
  const blockHeaderBody = Buffer.concat([Buffer.from([(headerPadded + 4) / 4 - 1, 0x00]), filter, padTo4(headerLen)]);
  const blockHeader = Buffer.concat([blockHeaderBody, u32le(crc32(blockHeaderBody))]);

  const parts: Buffer[] = [streamHeader, blockHeader];
  let compressedSize = 0;
  let check = 0;
  for (let off = 0; off < data.length; off += SLICE) {
    const slice = data.subarray(off, Math.min(off + SLICE, data.length));
    check = crc32(slice, check);
    for (let c = 0; c < slice.length; c += CHUNK) {
      const chunk = slice.subarray(c, c + CHUNK);
      const control = off === 0 && c === 0 ? 0x01 : 0x02; // the first chunk resets the dictionary
      const head = Buffer.from([control, (chunk.length - 1) >> 8, (chunk.length - 1) & 0xff]);
      parts.push(head, chunk);
      compressedSize += head.length + chunk.length;
    }
    if (off + SLICE < data.length) {
      await yieldToLoop();
      signal?.throwIfAborted();
    }
  }
  parts.push(Buffer.from([0x00])); // end of LZMA2 data
  compressedSize += 1;
  const unpadded = blockHeader.length + compressedSize;
  parts.push(padTo4(unpadded), u32le(check));

  const indexBody = Buffer.from([0x00, ...varint(1), ...varint(unpadded + 4), ...varint(data.length)]);
  const indexPadded = Buffer.concat([indexBody, padTo4(indexBody.length)]);
  const index = Buffer.concat([indexPadded, u32le(crc32(indexPadded))]);
  const footerBody = Buffer.concat([u32le(index.length / 4 - 1), flags]);
  const footer = Buffer.concat([u32le(crc32(footerBody)), footerBody, Buffer.from('YZ')]);
  parts.push(index, footer);
  return Buffer.concat(parts);
}
