/**
 * The kernel of an OpenShift release: the release payload lists its images in
 * `release-manifests/image-references` (an ImageStream); the `driver-toolkit` image carries
 * `etc/driver-toolkit-release.json` with `KERNEL_VERSION` and `RT_KERNEL_VERSION`.
 */
import { ImageReferenceError, parseImageReference } from '../image/reference.ts';

export const IMAGE_REFERENCES_PATH = 'release-manifests/image-references';
export const DRIVER_TOOLKIT_TAG = 'driver-toolkit';
export const DRIVER_TOOLKIT_RELEASE_PATH = 'etc/driver-toolkit-release.json';
const MAX_FILE_BYTES = 4 * 1024 * 1024;

/** Reads one regular file from an image's merged file system; `undefined` when absent. */
export type ImageFileReader = (image: string, path: string, maxBytes: number, signal?: AbortSignal) => Promise<Buffer | undefined>;

export type ReleaseResolution =
  | { readonly ok: true; readonly kernel: string; readonly driverToolkitImage: string; readonly rt: boolean }
  | { readonly ok: false; readonly code: string; readonly reason: string; readonly retriable: boolean };

export class ReleaseFileError extends Error {
  readonly retriable: boolean;
  readonly code: string;
  constructor(code: string, message: string, retriable: boolean, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ReleaseFileError';
    this.code = code;
    this.retriable = retriable;
  }
}

function fail(code: string, reason: string, retriable = false): ReleaseResolution {
  return { ok: false, code, reason, retriable };
}

/**
 * Resolves the kernel of `releaseImage`. Failures of reading images (`ReleaseFileError`,
 * thrown by the reader) become reasons; retriable ones (registry unreachable) say so.
 */
export async function resolveReleaseKernel(
  releaseImage: string,
  useRTKernel: boolean,
  read: ImageFileReader,
  signal?: AbortSignal,
): Promise<ReleaseResolution> {
  let refs: Buffer | undefined;
  try {
    refs = await read(releaseImage, IMAGE_REFERENCES_PATH, MAX_FILE_BYTES, signal);
  } catch (err) {
    if (err instanceof ReleaseFileError) return fail(err.code, `release image ${releaseImage}: ${err.message}`, err.retriable);
    throw err;
  }
  if (!refs) {
    return fail('NotAReleaseImage', `${releaseImage} is not an OpenShift release image: it has no /${IMAGE_REFERENCES_PATH}`);
  }
  let dtk: string | undefined;
  try {
    const stream = JSON.parse(refs.toString('utf8')) as { spec?: { tags?: { name?: string; from?: { kind?: string; name?: string } }[] } };
    dtk = stream.spec?.tags?.find((t) => t.name === DRIVER_TOOLKIT_TAG)?.from?.name;
  } catch (err) {
    return fail('InvalidImageReferences', `release image ${releaseImage}: /${IMAGE_REFERENCES_PATH} is not valid JSON (${(err as Error).message})`);
  }
  if (!dtk) {
    return fail(
      'NoDriverToolkit',
      `release image ${releaseImage} lists no "${DRIVER_TOOLKIT_TAG}" image in /${IMAGE_REFERENCES_PATH}: the driver-toolkit ships with OpenShift 4.6 and later`,
    );
  }
  try {
    parseImageReference(dtk);
  } catch (err) {
    if (err instanceof ImageReferenceError) return fail('InvalidDriverToolkitReference', `release image ${releaseImage}: ${err.message}`);
    throw err;
  }
  let release: Buffer | undefined;
  try {
    release = await read(dtk, DRIVER_TOOLKIT_RELEASE_PATH, MAX_FILE_BYTES, signal);
  } catch (err) {
    if (err instanceof ReleaseFileError) return fail(err.code, `driver-toolkit image ${dtk} of release ${releaseImage}: ${err.message}`, err.retriable);
    throw err;
  }
  if (!release) {
    return fail('NoDriverToolkitRelease', `driver-toolkit image ${dtk} of release ${releaseImage} has no /${DRIVER_TOOLKIT_RELEASE_PATH}`);
  }
  let fields: Record<string, unknown>;
  try {
    fields = JSON.parse(release.toString('utf8')) as Record<string, unknown>;
  } catch (err) {
    return fail('InvalidDriverToolkitRelease', `driver-toolkit image ${dtk}: /${DRIVER_TOOLKIT_RELEASE_PATH} is not valid JSON (${(err as Error).message})`);
  }
  const key = useRTKernel ? 'RT_KERNEL_VERSION' : 'KERNEL_VERSION';
  const kernel = fields[key];
  if (typeof kernel !== 'string' || kernel.trim() === '') {
    return fail(
      useRTKernel ? 'NoRTKernel' : 'NoKernel',
      `driver-toolkit image ${dtk} of release ${releaseImage} gives no ${key}${useRTKernel ? ': this release has no real-time kernel; set useRTKernel to false' : ''}`,
    );
  }
  return { ok: true, kernel: kernel.trim(), driverToolkitImage: dtk, rt: useRTKernel };
}
