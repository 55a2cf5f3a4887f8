import t from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { decompressModule, xzDecompressedSize } from '../../src/engine/modinfo.ts';
import { xzStore } from '../../src/sign/xz-container.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { writeTemp } from '../helpers/kmod-fixtures.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;

let xz: string;
t.before(async () => {
  xz = await ensureDebianBinary('xz', 'xz-utils');
});

/** `xz -dc` and `xz -lvv --robot` of `data`. */
async function xzTool(data: Buffer): Promise<{ decompressed: Buffer; listing: string }> {
  const file = await writeTemp('m.ko.xz', data);
  try {
    const { stdout: decompressed } = await run(xz, ['-dc', file.path], { encoding: 'buffer', maxBuffer: 64 * MiB });
    const { stdout: listing } = await run(xz, ['-lvv', '--robot', file.path]);
    return { decompressed, listing };
  } finally {
    await file.cleanup();
  }
}

t.test('xz-utils reads the files back, with a CRC32 check and a 1 MiB LZMA2 dictionary, as the kernel Makefile writes them', async (t) => {
  for (const size of [0, 1, 65535, 65536, 65537, MiB, MiB + 1, 3 * MiB + 12345]) {
    const data = randomBytes(size);
    const packed = await xzStore(data);
    const { decompressed, listing } = await xzTool(packed);
    t.ok(decompressed.equals(data), `${size} bytes: xz -d gives them back`);
    t.match(listing, /\tCRC32\t/, `${size} bytes: CRC32 check`);
    if (size > 0) t.match(listing, /--lzma2=dict=1MiB/, `${size} bytes: 1 MiB dictionary`);
    t.equal(xzDecompressedSize(packed), size, "the engine's size reader agrees");
    t.ok((await decompressModule(packed, 'xz', 64 * MiB)).equals(data), "the engine's decompressor agrees");
  }
});

t.test('an aborted signal rejects', async (t) => {
  await t.rejects(xzStore(randomBytes(10), AbortSignal.abort()), { name: 'AbortError' });
  const ac = new AbortController();
  const p = xzStore(randomBytes(8 * MiB), ac.signal);
  ac.abort();
  await t.rejects(p, { name: 'AbortError' }, 'between slices');
});
