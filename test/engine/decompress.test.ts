import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { gzipSync, zstdCompressSync } from 'node:zlib';
import t from 'tap';
import { decompressed, detectCompression } from '../../src/engine/decompress.ts';

const text = Buffer.from('ustar layer content '.repeat(1000));

t.test('compression is recognised by its bytes, not a media type', async (t) => {
  t.equal(detectCompression(gzipSync(text)), 'gzip');
  t.equal(detectCompression(zstdCompressSync(text)), 'zstd');
  t.equal(detectCompression(text), 'none');
  for (const data of [gzipSync(text), zstdCompressSync(text), text]) {
    t.same(await buffer(decompressed(Readable.from([data.subarray(0, 1), data.subarray(1, 3), data.subarray(3)]))), text);
  }
});

t.test('a decompression bomb is refused at the limit', async (t) => {
  const bomb = gzipSync(Buffer.alloc(10 * 1024 * 1024));
  await t.rejects(buffer(decompressed(Readable.from([bomb]), { maxOutputBytes: 1024 * 1024 })), /decompression bomb/);
});

t.test('an error of the source (digest mismatch) surfaces', async (t) => {
  const source = new Readable({ read() {} });
  source.push(gzipSync(text).subarray(0, 100));
  setImmediate(() => source.destroy(new Error('digest mismatch')));
  await t.rejects(buffer(decompressed(source)), /digest mismatch/);
});
