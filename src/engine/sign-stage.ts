/**
 * The Sign stage: what KMM's sign job does, in process. The module files of the unsigned image
 * (the Build output, else `sign.unsignedImage`) are signed with the Module's key and certificate,
 * each signature is verified against the certificate, and the signed files go into one new top
 * layer over the unsigned image, pushed as the Module's `containerImage` when `pushBuiltImage` is
 * set (docs/adr/0010-module-signing.md for the signing itself).
 *
 * Checks run cheapest first, so a bad key or a missing file costs no signing: the key against
 * the certificate, the files (every `filesToSign` pattern matches a module file), the Module's own
 * module in `<dirName>/lib/modules/<kernel>/` built for the kernel, then signing and verifying
 * (two files at a time; the hashing and RSA run in libuv's thread pool), then the push.
 */
import { posix } from 'node:path';
import type { Logger } from 'pino';
import { ImageReferenceError, parseImageReference } from '../image/reference.ts';
import type { RegistryHttpClient } from '../registry/client.ts';
import { RegistryError, type Platform, type RegistryAccess, type RegistryErrorCode } from '../registry/types.ts';
import {
  createModuleSigner,
  ModuleSignatureError,
  signModuleFile,
  SigningKeyError,
  verifyModuleFile,
  type ModuleSigner,
  type SignHashAlgorithm,
} from '../sign/module-signature.ts';
import { appendLayer, ImageLayersError, pushImage, readImageFiles, type ImageFile } from './image-layers.ts';
import { normalizeEntryPath } from './layer-scan.ts';
import { isModuleFileName, ModinfoError, moduleNameFromPath, normalizeModuleName, readModuleInfo } from './modinfo.ts';
import type { StageOutcome } from './types.ts';

export interface SignStageInput {
  /** The image to sign: the Build output, else `sign.unsignedImage`. */
  readonly inputImage: string;
  readonly inputAccess: RegistryAccess;
  /** The Module's `containerImage`: where the signed image goes. */
  readonly outputImage: string;
  readonly outputAccess: RegistryAccess;
  /** `pushBuiltImage`: without it, the signed image is built and verified, and nothing is pushed. */
  readonly push: boolean;
  /**
   * `sign.filesToSign`, glob patterns (`path.matchesGlob`): absolute = a path in the image,
   * relative = under `dirName`. Empty: every module file (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`)
   * under `<dirName>/lib/modules/<kernel>/`.
   */
  readonly filesToSign: readonly string[];
  readonly dirName: string;
  readonly moduleName: string;
  readonly kernel: string;
  /** PEM (or DER) private key and X.509 certificate. */
  readonly key: Buffer;
  readonly certificate: Buffer;
  /** Default sha256. */
  readonly hashAlgorithm?: SignHashAlgorithm;
  /** `namespace/name` of the key's Secret, for reasons. */
  readonly keySecret?: string;
  /** `namespace/name` of the certificate's Secret, for reasons. */
  readonly certSecret?: string;
  readonly platform: Platform;
  readonly signal?: AbortSignal;
}

export interface SignStageOutcome extends StageOutcome {
  /** Paths (in the image) of the files signed, when signed. */
  readonly signedFiles?: readonly string[];
  /** Digest of the pushed manifest, when pushed. */
  readonly digest?: string;
}

export interface SignStage {
  /** Resolves with the outcome; rejects only with the caller's abort reason. */
  run(input: SignStageInput): Promise<SignStageOutcome>;
}

export interface SignStageOptions {
  readonly registry: RegistryHttpClient;
  readonly logger?: Logger;
  /** Largest module file read from the image (default: readImageFiles', 256 MiB). */
  readonly maxFileBytes?: number;
  /** Largest sum of the module files read (default: readImageFiles', 1 GiB). */
  readonly maxTotalBytes?: number;
  /** Largest decompressed module, for signing and reading `.modinfo` (default 512 MiB). */
  readonly maxModuleBytes?: number;
  /** Files signed at once (default 2). */
  readonly concurrency?: number;
}

const DEFAULT_MAX_MODULE_BYTES = 512 * 1024 ** 2;
const NAMED_FILES = 3;

// ---------------------------------------------------------------------------------------------
// Outcomes of failures

function keyOutcome(err: SigningKeyError, input: SignStageInput): SignStageOutcome {
  const key = input.keySecret ? `the private key in Secret ${input.keySecret}` : 'the signing key';
  const cert = input.certSecret ? `the certificate in Secret ${input.certSecret}` : 'the signing certificate';
  let reason: string;
  switch (err.code) {
    case 'KeyMismatch':
      reason = `${key} does not match ${cert}: ${err.message.replace(/^the signing key does not match the certificate:\s*/, '')}`;
      break;
    case 'InvalidKey':
      reason = `${key} cannot be used: ${err.message}`;
      break;
    case 'InvalidCertificate':
      reason = `${cert} cannot be used: ${err.message}`;
      break;
    case 'UnsupportedKey':
      reason = `${key} or ${cert} cannot sign kernel modules: ${err.message}`;
      break;
  }
  return { status: 'False', code: err.code, reason };
}

const INPUT_ERRORS: Record<RegistryErrorCode, { status: 'False' | 'Error'; code: string }> = {
  NotFound: { status: 'False', code: 'UnsignedImageNotFound' },
  Unauthorized: { status: 'False', code: 'UnsignedImageUnauthorized' },
  NoMatchingPlatform: { status: 'False', code: 'UnsignedImagePlatformNotFound' },
  DigestMismatch: { status: 'False', code: 'UnsignedImageInvalid' },
  Invalid: { status: 'False', code: 'UnsignedImageInvalid' },
  TooLarge: { status: 'False', code: 'UnsignedImageInvalid' },
  Unreachable: { status: 'Error', code: 'RegistryUnreachable' },
  Timeout: { status: 'Error', code: 'RegistryTimeout' },
  RateLimited: { status: 'Error', code: 'RegistryRateLimited' },
  ServerError: { status: 'Error', code: 'RegistryServerError' },
};

const LAYER_ERRORS: Record<ImageLayersError['code'], string> = {
  PathEscape: 'UnsignedImageInvalid',
  InvalidArchive: 'UnsignedImageInvalid',
  InvalidConfig: 'UnsignedImageInvalid',
  FileTooLarge: 'UnsignedImageTooLarge',
  TotalTooLarge: 'UnsignedImageTooLarge',
  LayerTooLarge: 'UnsignedImageTooLarge',
  InvalidFile: 'InvalidInput',
  InvalidTarget: 'InvalidInput',
};

/** Reading the unsigned image failed; rethrows what is not a registry or layer refusal. */
function inputOutcome(err: unknown, image: string): SignStageOutcome {
  if (err instanceof RegistryError) {
    const m = INPUT_ERRORS[err.code];
    const what =
      err.code === 'NotFound'
        ? 'not found'
        : err.code === 'Unauthorized'
          ? 'cannot be read with the pull secret'
          : err.code === 'NoMatchingPlatform'
            ? 'has no image for the platform'
            : 'cannot be read';
    return { status: m.status, code: m.code, reason: `unsigned image ${image} ${what}: ${err.message}` };
  }
  if (err instanceof ImageLayersError) return { status: 'False', code: LAYER_ERRORS[err.code], reason: `cannot sign image ${image}: ${err.message}` };
  if (err instanceof ImageReferenceError) return { status: 'False', code: 'InvalidInput', reason: err.message };
  throw err;
}

function pushOutcome(err: unknown, output: string): SignStageOutcome {
  if (err instanceof RegistryError) {
    if (err.code === 'Unauthorized') {
      return { status: 'False', code: 'PushUnauthorized', reason: `cannot push the signed image to ${output}: ${err.message}` };
    }
    return { status: 'Error', code: 'PushFailed', reason: `pushing the signed image to ${output} failed: ${err.message}` };
  }
  if (err instanceof ImageLayersError) return { status: 'False', code: LAYER_ERRORS[err.code], reason: `cannot push the signed image to ${output}: ${err.message}` };
  throw err;
}

/** `a, b, c and 2 more`. */
function nameFiles(paths: readonly string[]): string {
  if (paths.length <= NAMED_FILES) return paths.join(', ');
  return `${paths.slice(0, NAMED_FILES).join(', ')} and ${paths.length - NAMED_FILES} more`;
}

async function mapLimited<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!);
      } catch (err) {
        failed = true; // the other workers stop after their current file
        throw err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  return out;
}

/** A per-file failure that ends the run with this outcome. */
class Refusal extends Error {
  readonly outcome: SignStageOutcome;
  constructor(outcome: SignStageOutcome) {
    super(outcome.reason);
    this.outcome = outcome;
  }
}

// ---------------------------------------------------------------------------------------------
// The stage

export function createSignStage(options: SignStageOptions): SignStage {
  const { registry } = options;
  const maxModuleBytes = options.maxModuleBytes ?? DEFAULT_MAX_MODULE_BYTES;
  const concurrency = options.concurrency ?? 2;
  const log = options.logger;

  async function run(input: SignStageInput): Promise<SignStageOutcome> {
    const { signal } = input;
    signal?.throwIfAborted();
    const image = input.inputImage;

    // ---- inputs
    const dir = normalizeEntryPath(input.dirName || '/opt');
    if (dir === undefined || input.kernel === '' || input.kernel.includes('/') || input.kernel === '.' || input.kernel === '..') {
      return { status: 'False', code: 'InvalidInput', reason: `cannot look for modules under ${input.dirName}/lib/modules/${input.kernel}: not a valid directory` };
    }
    const root = dir === '' ? '' : `/${dir}`;
    const kernelDir = `${root}/lib/modules/${input.kernel}/`;
    if (input.push) {
      try {
        parseImageReference(input.outputImage);
      } catch (err) {
        return { status: 'False', code: 'InvalidInput', reason: `cannot push the signed image: ${(err as Error).message}` };
      }
    }
    const patterns = input.filesToSign.map((p) => posix.normalize(p.startsWith('/') ? p : `${root}/${p}`));
    const inKernelDir = (path: string): boolean => path.startsWith(kernelDir);
    const byPattern = (path: string): boolean => patterns.some((g) => posix.matchesGlob(path, g));

    // ---- key and certificate
    let signer: ModuleSigner;
    try {
      signer = createModuleSigner(input.key, input.certificate, input.hashAlgorithm);
    } catch (err) {
      if (err instanceof SigningKeyError) return keyOutcome(err, input);
      throw err;
    }
    const keyText = `key ${signer.keyId} (${signer.signer}, ${signer.hashAlgorithm})`;

    // ---- the files
    let read;
    try {
      read = await readImageFiles(registry, image, input.inputAccess, input.platform, (p) => isModuleFileName(p) && (inKernelDir(p) || byPattern(p)), {
        // Unset limits take readImageFiles' defaults.
        ...(options.maxFileBytes !== undefined ? { maxFileBytes: options.maxFileBytes } : {}),
        ...(options.maxTotalBytes !== undefined ? { maxTotalBytes: options.maxTotalBytes } : {}),
        ...(signal ? { signal } : {}),
      });
    } catch (err) {
      signal?.throwIfAborted();
      return inputOutcome(err, image);
    }
    const { resolved, files } = read;
    let toSign: ImageFile[];
    if (patterns.length === 0) {
      toSign = files.filter((f) => inKernelDir(f.path));
      if (toSign.length === 0) {
        return {
          status: 'False',
          code: 'FileToSignMissing',
          reason: `image ${image} has no kernel module file (.ko, .ko.xz, .ko.zst or .ko.gz) under ${kernelDir} to sign, and sign.filesToSign is empty`,
        };
      }
    } else {
      const missing = patterns.filter((g) => !files.some((f) => posix.matchesGlob(f.path, g)));
      if (missing.length > 0) {
        return {
          status: 'False',
          code: 'FileToSignMissing',
          reason: `sign.filesToSign ${missing.length === 1 ? 'pattern' : 'patterns'} ${missing.join(', ')} ${missing.length === 1 ? 'matches' : 'match'} no kernel module file (.ko, .ko.xz, .ko.zst or .ko.gz) in image ${image}`,
        };
      }
      toSign = files.filter((f) => byPattern(f.path));
    }

    // ---- the Module's own module, built for the kernel. Signing leaves .modinfo as it is, so
    // this is checked on the unsigned files, before any signing work.
    const wanted = normalizeModuleName(input.moduleName);
    const own = files.filter((f) => inKernelDir(f.path) && moduleNameFromPath(f.path) === wanted);
    if (own.length === 0) {
      return {
        status: 'False',
        code: 'ModuleNotFound',
        reason: `module ${input.moduleName} is not in ${kernelDir} of image ${image}${toSign.length > 0 ? ` (the files to sign are ${nameFiles(toSign.map((f) => f.path))})` : ''}`,
      };
    }
    let builtFor: string | undefined;
    for (const f of own) {
      let vermagic: string | undefined;
      try {
        vermagic = (await readModuleInfo(f.data, f.path, maxModuleBytes)).vermagic;
      } catch (err) {
        if (!(err instanceof ModinfoError)) throw err;
        return { status: 'False', code: 'ModuleUnreadable', reason: `module file ${f.path} in image ${image} cannot be read: ${err.message}` };
      }
      if (vermagic !== undefined && (vermagic === input.kernel || vermagic.startsWith(`${input.kernel} `))) {
        builtFor = undefined;
        break;
      }
      builtFor ??= `${f.path} was built for ${vermagic === undefined ? 'no kernel (it has no vermagic)' : (vermagic.split(' ')[0] ?? vermagic)}`;
    }
    if (builtFor !== undefined) {
      return { status: 'False', code: 'VermagicMismatch', reason: `module ${input.moduleName} in image ${image} is not built for kernel ${input.kernel}: ${builtFor}` };
    }

    // ---- sign and verify
    let signed: ImageFile[];
    try {
      signed = await mapLimited(toSign, concurrency, async (f) => {
        let data: Buffer;
        try {
          data = await signModuleFile(f.data, f.path, signer, { maxBytes: maxModuleBytes, ...(signal ? { signal } : {}) });
        } catch (err) {
          signal?.throwIfAborted();
          if (err instanceof ModinfoError || err instanceof ModuleSignatureError) {
            throw new Refusal({ status: 'False', code: 'SigningFailed', reason: `cannot sign ${f.path} of image ${image} with ${keyText}: ${err.message}` });
          }
          throw err;
        }
        let verified;
        try {
          verified = await verifyModuleFile(data, f.path, input.certificate, { maxBytes: maxModuleBytes, ...(signal ? { signal } : {}) });
        } catch (err) {
          signal?.throwIfAborted();
          if (err instanceof ModinfoError || err instanceof ModuleSignatureError) {
            throw new Refusal({
              status: 'False',
              code: 'SignatureVerificationFailed',
              reason: `the signature of ${f.path} of image ${image} made with ${keyText} does not verify against the certificate: ${err.message}`,
            });
          }
          throw err;
        }
        if (verified.signer !== signer.signer || verified.keyId !== signer.keyId || verified.hashAlgorithm !== signer.hashAlgorithm) {
          throw new Refusal({
            status: 'False',
            code: 'SignatureVerificationFailed',
            reason: `the signature of ${f.path} of image ${image} names key ${verified.keyId} (${verified.signer}, ${verified.hashAlgorithm}), not the ${keyText} it was made with`,
          });
        }
        return { path: f.path, data, mode: f.mode };
      });
    } catch (err) {
      signal?.throwIfAborted();
      if (err instanceof Refusal) return err.outcome;
      return { status: 'Error', code: 'InternalError', reason: `signing the files of image ${image} failed: ${(err as Error).message}` };
    }
    const signedFiles = signed.map((f) => f.path);
    const what = `signed ${signed.length} file${signed.length === 1 ? '' : 's'} (${nameFiles(signedFiles)}) with ${keyText}`;

    // ---- the new image
    let built;
    try {
      built = await appendLayer(registry, { image, access: input.inputAccess, resolved }, signed, {
        history: `kmm-preflight: signed ${nameFiles(signedFiles)} with key ${signer.keyId}`,
        ...(signal ? { signal } : {}),
      });
    } catch (err) {
      signal?.throwIfAborted();
      return inputOutcome(err, image);
    }
    if (!input.push) {
      log?.info({ image, files: signedFiles, keyId: signer.keyId }, 'signed, not pushed');
      return { status: 'True', code: 'Signed', reason: `${what} over image ${image}, verified, not pushed (pushBuiltImage is false)`, signedFiles };
    }
    let digest: string;
    try {
      digest = await pushImage(registry, built, input.outputImage, input.outputAccess, { baseAccess: input.inputAccess, ...(signal ? { signal } : {}) });
    } catch (err) {
      signal?.throwIfAborted();
      return pushOutcome(err, input.outputImage);
    }
    log?.info({ image, output: input.outputImage, digest, files: signedFiles, keyId: signer.keyId }, 'signed and pushed');
    return { status: 'True', code: 'Signed', reason: `${what} and pushed ${input.outputImage}@${digest}`, signedFiles, digest };
  }

  return { run };
}
