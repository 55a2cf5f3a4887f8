/**
 * Reads one file from an image's merged file system, scanning layers from the top down and
 * stopping at the first layer that decides it (the file, a whiteout of it, or an opaque parent).
 * Used for small metadata files such as an OpenShift release's image references.
 */
import { posix } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { parseImageReference, withDefaultTag } from '../image/reference.ts';
import { RegistryError, type Platform, type RegistryAccess, type RegistryClient } from '../registry/types.ts';
import { decompressed } from './decompress.ts';
import { ReleaseFileError, type ImageFileReader } from './ocp-release.ts';

type LayerVerdict = { found: Buffer } | { hidden: true } | undefined;

function normalise(p: string): string {
  return posix.normalize(`/${p}`).replace(/\/+$/, '');
}

async function scanLayer(blob: Readable, wanted: string, maxBytes: number): Promise<LayerVerdict> {
  const extract = tar.extract();
  let verdict: LayerVerdict;
  const dir = posix.dirname(wanted);
  const base = posix.basename(wanted);
  extract.on('entry', (header, stream, next) => {
    const name = normalise(header.name);
    const entryDir = posix.dirname(name);
    const entryBase = posix.basename(name);
    if (name === wanted && header.type === 'file') {
      if ((header.size ?? 0) > maxBytes) {
        stream.resume();
        verdict = undefined;
        next(new Error(`${wanted} is larger than ${maxBytes} bytes`));
        return;
      }
      const chunks: Buffer[] = [];
      stream.on('data', (c: unknown) => void chunks.push(c as Buffer));
      stream.on('end', () => {
        verdict = { found: Buffer.concat(chunks) };
        next();
      });
      return;
    }
    if ((entryDir === dir && entryBase === `.wh.${base}`) || (entryBase === '.wh..wh..opq' && (dir === entryDir || dir.startsWith(`${entryDir}/`)))) {
      verdict ??= { hidden: true };
    }
    stream.on('end', () => next());
    stream.resume();
  });
  await pipeline(decompressed(blob), extract);
  return verdict;
}

function asReleaseError(err: unknown): ReleaseFileError {
  if (err instanceof RegistryError) {
    const retriable = ['Unreachable', 'Timeout', 'RateLimited', 'ServerError'].includes(err.code);
    return new ReleaseFileError(err.code, err.message, retriable, { cause: err });
  }
  return new ReleaseFileError('Invalid', (err as Error).message, false, { cause: err });
}

/**
 * An {@link ImageFileReader} over a registry client; registry failures become ReleaseFileErrors.
 * `access` may depend on the registry of each image (a release and its driver-toolkit can live
 * in different registries).
 */
export function registryFileReader(
  registry: RegistryClient,
  access: RegistryAccess | ((registryHost: string) => RegistryAccess),
  platform: Platform,
): ImageFileReader {
  return async (image, path, maxBytes, signal) => {
    try {
      const ref = withDefaultTag(parseImageReference(image));
      const a = typeof access === 'function' ? access(ref.domain) : access;
      const resolved = await registry.resolveImage(ref, a, platform, signal ? { signal } : {});
      const wanted = normalise(path);
      for (const layer of [...resolved.layers].reverse()) {
        const blob = await registry.openBlob(ref, layer, a, signal ? { signal } : {});
        const verdict = await scanLayer(blob, wanted, maxBytes);
        if (verdict && 'found' in verdict) return verdict.found;
        if (verdict) return undefined;
      }
      return undefined;
    } catch (err) {
      throw asReleaseError(err);
    }
  };
}
