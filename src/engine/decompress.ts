/**
 * Layer decompression chosen by the content's first bytes, not by the declared media type
 * (registries and build tools get media types wrong): gzip, zstd, or a plain tar.
 */
import { Readable } from 'node:stream';
import { createGunzip, createZstdDecompress } from 'node:zlib';

const GZIP = Buffer.from([0x1f, 0x8b]);
const ZSTD = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);

export type LayerCompression = 'gzip' | 'zstd' | 'none';

export function detectCompression(head: Buffer): LayerCompression {
  if (head.subarray(0, 2).equals(GZIP)) return 'gzip';
  if (head.subarray(0, 4).equals(ZSTD)) return 'zstd';
  return 'none';
}

/**
 * The decompressed content of `source`. `maxOutputBytes` bounds the decompressed size, so that a
 * decompression bomb errors the stream instead of filling memory or disk. Errors of `source`
 * (a digest mismatch, a reset) surface as errors of the result.
 */
export function decompressed(source: Readable, options: { maxOutputBytes?: number } = {}): Readable {
  const max = options.maxOutputBytes ?? Number.POSITIVE_INFINITY;
  return Readable.from(
    (async function* () {
      const it = source[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
      const head: Buffer[] = [];
      let headBytes = 0;
      while (headBytes < 4) {
        const r = await it.next();
        if (r.done) break;
        head.push(r.value);
        headBytes += r.value.length;
      }
      const kind = detectCompression(Buffer.concat(head));
      const raw = Readable.from(
        (async function* () {
          yield* head;
          for (;;) {
            const r = await it.next();
            if (r.done) return;
            yield r.value;
          }
        })(),
        { objectMode: false },
      );
      let out: Readable = raw;
      if (kind !== 'none') {
        const inflate = kind === 'gzip' ? createGunzip() : createZstdDecompress();
        raw.on('error', (err) => inflate.destroy(err));
        out = raw.pipe(inflate);
      }
      let produced = 0;
      try {
        for await (const chunk of out as AsyncIterable<Buffer>) {
          produced += chunk.length;
          if (produced > max) throw new Error(`the layer expands beyond ${max} bytes: refused as a decompression bomb`);
          yield chunk;
        }
      } finally {
        out.destroy();
        source.destroy();
      }
    })(),
    { objectMode: false },
  );
}
