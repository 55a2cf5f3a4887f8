/**
 * An `.xz` file as the kernel's `scripts/Makefile.modinst` asks for one (`xz --check=crc32
 * --lzma2=dict=1MiB`): one stream, CRC32 check, one block with the LZMA2 filter and a 1 MiB
 * dictionary, an index and a footer. The kernel's in-kernel decompressor (`CONFIG_MODULE_DECOMPRESS`)
 * supports only the CRC32 check, and kmod and xz-utils read the same file.
 *
 * The container is written here because `@napi-rs/lzma`'s own xz encoder (1.5.3) takes only a
 * preset and always writes a CRC64 check with the preset's dictionary (8 MiB at preset 6). Its raw
 * LZMA2 encoder takes a dictionary size, so it compresses the data (preset 6, as `xz` does by
 * default, with a 1 MiB dictionary) and this file frames it. See docs/adr/0010.
 */
import { crc32 } from 'node:zlib';
import { lzma2 } from '@napi-rs/lzma';

const MAGIC = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
const CHECK_CRC32 = 0x01;
const LZMA2_FILTER_ID = 0x21;
/** The dictionary the encoder uses; the block header must declare the same. */
const DICT_SIZE = 1024 * 1024;
/** LZMA2 dictionary-size property: size = (2 | (p & 1)) << (p / 2 + 11); 16 → 1 MiB. */
const DICT_1MIB = 16;
/** xz's default preset, which `--lzma2=dict=1MiB` starts from. */
const PRESET = 6;
/** Input handed to the encoder (and CRC'd on the main thread) per pull. */
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
 * Raw LZMA2 data for `data` (1 MiB dictionary, preset 6, end marker included) and the CRC32 of
 * `data`. The encoder runs off the main thread; the main thread only hands it 1 MiB slices and
 * CRCs them. `signal` cancels the encoder's output stream.
 */
async function lzma2Compress(data: Buffer, signal?: AbortSignal): Promise<{ compressed: Buffer; check: number }> {
  let check = 0;
  let off = 0;
  const input = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (off >= data.length) {
        controller.close();
        return;
      }
      const slice = data.subarray(off, off + SLICE);
      check = crc32(slice, check);
      off += slice.length;
      controller.enqueue(slice);
    },
  });
  const reader = lzma2.compressStream(input, { preset: PRESET, dictSize: DICT_SIZE }).getReader();
  // Cancelling ends a pending read at once; the encoder stops at its next pull of input.
  const onAbort = (): void => void reader.cancel(signal?.reason).catch(() => undefined);
  signal?.addEventListener('abort', onAbort, { once: true });
  const chunks: Buffer[] = [];
  try {
    for (;;) {
      const { done, value } = await reader.read();
      signal?.throwIfAborted();
      if (done) break;
      chunks.push(value);
    }
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  return { compressed: Buffer.concat(chunks), check };
}

/**
 * `data` compressed into an `.xz` file (CRC32 check, LZMA2 with a 1 MiB dictionary). The
 * compression runs off the main thread; `signal` aborts it.
 */
export async function xzCompress(data: Buffer, signal?: AbortSignal): Promise<Buffer> {
  signal?.throwIfAborted();
  const { compressed, check } = await lzma2Compress(data, signal);

  const flags = Buffer.from([0x00, CHECK_CRC32]);
  const streamHeader = Buffer.concat([MAGIC, flags, u32le(crc32(flags))]);

  // Block header: size byte, flags (one filter, no sizes), filter flags, padding, CRC32.
  const filter = Buffer.from([LZMA2_FILTER_ID, 0x01, DICT_1MIB]);
  const headerLen = 2 + filter.length;
  const headerPadded = headerLen + ((4 - (headerLen % 4)) % 4);
  const blockHeaderBody = Buffer.concat([Buffer.from([(headerPadded + 4) / 4 - 1, 0x00]), filter, padTo4(headerLen)]);
  const blockHeader = Buffer.concat([blockHeaderBody, u32le(crc32(blockHeaderBody))]);

  const unpadded = blockHeader.length + compressed.length;
  const indexBody = Buffer.from([0x00, ...varint(1), ...varint(unpadded + 4), ...varint(data.length)]);
  const indexPadded = Buffer.concat([indexBody, padTo4(indexBody.length)]);
  const index = Buffer.concat([indexPadded, u32le(crc32(indexPadded))]);
  const footerBody = Buffer.concat([u32le(index.length / 4 - 1), flags]);
  const footer = Buffer.concat([u32le(crc32(footerBody)), footerBody, Buffer.from('YZ')]);
  return Buffer.concat([streamHeader, blockHeader, compressed, padTo4(unpadded), u32le(check), index, footer]);
}
