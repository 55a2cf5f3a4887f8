import t from 'tap';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { promisify } from 'node:util';
import { decompressModule, xzDecompressedSize } from '../../src/engine/modinfo.ts';
import { xzCompress } from '../../src/sign/xz-container.ts';
import { ensureDebianBinary } from '../helpers/debian.ts';
import { writeTemp } from '../helpers/kmod-fixtures.ts';

const run = promisify(execFile);
const MiB = 1024 * 1024;

let xz: string;
t.before(async () => {
  xz = await ensureDebianBinary('xz', 'xz-utils');
});

/** `xz -dc` and `xz -lvv --robot` of `data`, and the decoder memory the listing's summary states. */
async function xzTool(data: Buffer): Promise<{ decompressed: Buffer; listing: string; memusage: number }> {
  const file = await writeTemp('m.ko.xz', data);
  try {
    const { stdout: decompressed } = await run(xz, ['-dc', file.path], { encoding: 'buffer', maxBuffer: 64 * MiB });
    const { stdout: listing } = await run(xz, ['-lvv', '--robot', file.path]);
    return { decompressed, listing, memusage: summaryMemusage(listing) };
  } finally {
    await file.cleanup();
  }
}

/** The `summary` line of `xz -lvv --robot`: memory needed to decompress, sizes in headers, minimum xz version. */
function summaryMemusage(listing: string): number {
  const summary = listing.split('\n').find((l) => l.startsWith('summary\t'));
  if (!summary) throw new Error(`no summary line in:\n${listing}`);
  return Number(summary.split('\t')[1]);
}

/** `data` compressed by xz-utils as the kernel's Makefile.modinst does. */
async function kernelXz(data: Buffer): Promise<Buffer> {
  const file = await writeTemp('m.ko', data);
  try {
    await run(xz, ['--check=crc32', '--lzma2=dict=1MiB', '-k', '-f', file.path]);
    return await readFile(`${file.path}.xz`);
  } finally {
    await file.cleanup();
  }
}

/** Words drawn from a vocabulary of 4000 in a pseudo-random order: compresses several times, not to nothing. */
function compressible(size: number): Buffer {
  const words = Array.from({ length: 4000 }, () => randomBytes(5).toString('hex'));
  const out = Buffer.alloc(size);
  let x = 1;
  for (let off = 0; off < size; ) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    off += out.write(`${words[(x >>> 8) % words.length]} `, off);
  }
  return out;
}

t.test('xz-utils reads the files back, with a CRC32 check and a 1 MiB LZMA2 dictionary, as the kernel Makefile writes them', async (t) => {
  for (const size of [0, 1, 65535, 65536, 65537, MiB, MiB + 1, 3 * MiB + 12345]) {
    const data = randomBytes(size);
    const packed = await xzCompress(data);
    const { decompressed, listing } = await xzTool(packed);
    t.ok(decompressed.equals(data), `${size} bytes: xz -d gives them back`);
    t.match(listing, /\tCRC32\t/, `${size} bytes: CRC32 check`);
    t.match(listing, /--lzma2=dict=1MiB/, `${size} bytes: 1 MiB dictionary`);
    t.ok(packed.length <= data.length + 200 + data.length / 1000, `${size} bytes: random data costs little more than its size (${packed.length})`);
    t.equal(xzDecompressedSize(packed), size, "the engine's size reader agrees");
    t.ok((await decompressModule(packed, 'xz', 64 * MiB)).equals(data), "the engine's decompressor agrees");
  }
});

t.test('compresses as xz --check=crc32 --lzma2=dict=1MiB does, and needs the same decoder memory', async (t) => {
  for (const size of [300_000, 3 * MiB]) {
    const data = compressible(size);
    const [packed, theirs] = await Promise.all([xzCompress(data), kernelXz(data)]);
    const ours = await xzTool(packed);
    const reference = await xzTool(theirs);
    t.ok(ours.decompressed.equals(data), `${size} bytes: xz -d gives them back`);
    t.ok(packed.length < data.length / 3, `${size} bytes: compressed to ${packed.length}`);
    t.ok(packed.length <= theirs.length * 1.05, `${size} bytes: within 5 % of xz's ${theirs.length}`);
    t.match(ours.listing, /\tCRC32\t/, 'CRC32 check');
    t.match(ours.listing, /--lzma2=dict=1MiB/, '1 MiB dictionary');
    t.equal(ours.memusage, reference.memusage, `decoder memory ${ours.memusage}, as for xz's file`);
    t.ok(ours.memusage >= MiB && ours.memusage < 2 * MiB, 'which is 1 MiB and the decoder state');
    t.equal(xzDecompressedSize(packed), size, "the engine's size reader agrees");
  }
});

t.test('the encoder keeps to the 1 MiB dictionary the header declares: a repeat 512 KiB back is found, 1.5 MiB back is not', async (t) => {
  const near = randomBytes(MiB / 2);
  const nearPacked = await xzCompress(Buffer.concat([near, near]));
  t.ok(nearPacked.length < near.length * 1.01, `512 KiB twice: ${nearPacked.length} bytes`);
  t.ok((await xzTool(nearPacked)).decompressed.equals(Buffer.concat([near, near])), 'xz -d gives them back');
  const far = randomBytes(MiB + MiB / 2);
  const farPacked = await xzCompress(Buffer.concat([far, far]));
  t.ok(farPacked.length > far.length * 1.99, `1.5 MiB twice: ${farPacked.length} bytes, no match beyond the dictionary`);
  t.ok((await xzTool(farPacked)).decompressed.equals(Buffer.concat([far, far])), 'xz -d (with a 1 MiB dictionary) gives them back');
});

t.test('the compression runs off the main thread: other work runs meanwhile', async (t) => {
  let turns = 0;
  let running = true;
  const spin = (): void => {
    if (!running) return;
    turns++;
    setImmediate(spin);
  };
  setImmediate(spin);
  const data = compressible(4 * MiB);
  const packed = await xzCompress(data);
  running = false;
  // Hashing the 4 slices takes a few turns; a blocking encoder would leave not many more.
  t.ok(turns >= 100, `other work ran ${turns} times while 4 MiB were compressed`);
  t.equal(xzDecompressedSize(packed), data.length);
});

t.test('an aborted signal rejects', async (t) => {
  await t.rejects(xzCompress(randomBytes(10), AbortSignal.abort()), { name: 'AbortError' });
  const ac = new AbortController();
  const p = xzCompress(compressible(8 * MiB), ac.signal);
  setTimeout(() => ac.abort(), 50);
  const started = performance.now();
  await t.rejects(p, { name: 'AbortError' }, 'while compressing');
  t.ok(performance.now() - started < 1000, 'without waiting for the compression to finish');
});
