/**
 * The narrow interface of the OCI distribution client that the validation engine uses. One
 * implementation talks to real registries (src/registry/client.ts); tests of the engine may use
 * fakes of this interface.
 */
import type { Readable } from 'node:stream';
import type { ImageReference } from '../image/reference.ts';

/** Credentials for one registry host, as found in a `.dockerconfigjson` pull secret. */
export interface RegistryAuth {
  readonly username?: string;
  readonly password?: string;
  /** Refresh token (`identitytoken`) for the OAuth2 token flow. */
  readonly identityToken?: string;
  /** A token to send as is (`registrytoken`). */
  readonly registryToken?: string;
}

/** A parsed `.dockerconfigjson`: host (with port, as written in the secret) → credentials. */
export type DockerConfig = ReadonlyMap<string, RegistryAuth>;

/** How to reach one registry: KMM's `registryTLS` plus credentials. */
export interface RegistryAccess {
  readonly credentials?: DockerConfig;
  /** Plain HTTP (KMM `registryTLS.insecure`). */
  readonly insecure?: boolean;
  /** HTTPS without verifying the server certificate (KMM `registryTLS.insecureSkipTLSVerify`). */
  readonly insecureSkipTLSVerify?: boolean;
  /** Extra trusted CA certificates (PEM), e.g. a cluster-wide registry CA. */
  readonly caCertificates?: readonly string[];
}

export interface Platform {
  readonly os: string;
  readonly architecture: string;
  readonly variant?: string;
}

export interface Descriptor {
  readonly mediaType: string;
  readonly digest: string;
  readonly size: number;
}

/** A single-platform image manifest, resolved (through an index when needed) for one platform. */
export interface ResolvedImage {
  readonly reference: ImageReference;
  /** Digest of the manifest that was resolved (of the platform's manifest, not of the index). */
  readonly digest: string;
  /** Digest of the index, when the reference pointed at one. */
  readonly indexDigest?: string;
  readonly mediaType: string;
  readonly config: Descriptor;
  /** Layers from the bottom (first applied) to the top. */
  readonly layers: readonly Descriptor[];
  readonly platform?: Platform;
}

export type RegistryErrorCode =
  | 'NotFound' // repository, tag, manifest or blob does not exist
  | 'Unauthorized' // credentials missing or refused (401/403)
  | 'Unreachable' // DNS, connection refused/reset, TLS failure
  | 'Timeout'
  | 'RateLimited' // 429 after retries
  | 'ServerError' // 5xx after retries
  | 'DigestMismatch' // content does not match its digest
  | 'TooLarge' // response over the size limit
  | 'NoMatchingPlatform' // an index without the wanted platform
  | 'Invalid'; // malformed manifest or response

export class RegistryError extends Error {
  readonly code: RegistryErrorCode;
  /** The registry host, for reasons a person can act on. */
  readonly registry: string;
  constructor(code: RegistryErrorCode, registry: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'RegistryError';
    this.code = code;
    this.registry = registry;
  }
}

export interface RequestOptions {
  readonly signal?: AbortSignal;
}

export interface RegistryClient {
  /**
   * Fetches the manifest for `ref` (tag or digest), following an index to the manifest of
   * `platform`. Rejects with {@link RegistryError}.
   */
  resolveImage(ref: ImageReference, access: RegistryAccess, platform: Platform, options?: RequestOptions): Promise<ResolvedImage>;

  /**
   * Streams a blob (compressed as stored). The stream errors with a `DigestMismatch`
   * {@link RegistryError} at its end when the bytes do not match `descriptor.digest`, and with
   * `TooLarge` past `descriptor.size`; destroying it aborts the download. What was read is
   * provisional until the stream ends cleanly: a consumer must not conclude from a blob that
   * later fails its digest check.
   */
  openBlob(ref: ImageReference, descriptor: Descriptor, access: RegistryAccess, options?: RequestOptions): Promise<Readable>;

  /** Bytes received from registries so far (for metrics and benchmarks). */
  readonly bytesReceived: number;
}
