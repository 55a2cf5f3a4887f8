/**
 * The Build stage's builders, behind one interface: Kubernetes Jobs running kaniko in a cluster
 * (job-builder.ts) and Debian's buildah on this machine in stand-alone mode and for the `check`
 * command (local-builder.ts).
 *
 * A build outlives one call: `run` starts it (idempotently: the same key and fingerprint never
 * start a second build) and reports its state; the caller asks again when `onUpdate` names the key
 * or after a while. A finished build's outcome is kept until `release(key)`, which the caller
 * calls once the outcome is recorded; then the builder removes what the build left (the Job, a
 * local image). A request with another fingerprint for a key replaces the earlier build.
 */
import type { BuildArg, ResolvedTLS } from '../engine/module.ts';

/** The validation object that owns a build (for the Job's owner reference and labels). */
export interface BuildOwner {
  readonly apiVersion: string;
  readonly kind: string;
  readonly name: string;
  readonly uid: string;
}

export interface BuildRequest {
  /** Stable identity of the (validation object, Module) pair, e.g. `pfv/upgrade|ns/module`. */
  readonly key: string;
  readonly owner: BuildOwner;
  /** The Module's namespace and name. */
  readonly namespace: string;
  readonly moduleName: string;
  /** The target kernel as `uname -r` prints it. */
  readonly kernel: string;
  /** The Dockerfile's text (data key `dockerfile` of the ConfigMap below). */
  readonly dockerfile: string;
  /** The ConfigMap holding the Dockerfile, in the Module's namespace (Jobs mount it). */
  readonly dockerfileConfigMap: string;
  /** Final build arguments, in order (KMM's own and the Module's, mapping wins by name). */
  readonly buildArgs: readonly BuildArg[];
  /** `build.secrets`: Secret names in the Module's namespace, mounted at `/run/secrets/<name>`. */
  readonly secrets: readonly string[];
  /** Data of those Secrets, for builders that run here (never logged). */
  readonly secretData?: (name: string) => Readonly<Record<string, Buffer>> | undefined;
  /** Where the image goes: `containerImage`, or a temporary name when a Sign stage follows. */
  readonly destination: string;
  /** Push the result to `destination` (the object's `pushBuiltImage`). */
  readonly push: boolean;
  /** TLS to the destination registry (KMM `registryTLS`). */
  readonly registryTLS: ResolvedTLS;
  /** TLS to the base images' registries (KMM `build.baseImageRegistryTLS`). */
  readonly baseImageRegistryTLS: ResolvedTLS;
  /** The Module's `imageRepoSecret` (pull and push credentials), by name for Jobs... */
  readonly imageRepoSecret?: string;
  /** ...and its `.dockerconfigjson` text for builders that run here (never logged). */
  readonly dockerConfigJson?: string;
  /** `build.selector`: node selection for the build. */
  readonly selector?: Readonly<Record<string, string>>;
  /** `build.kanikoParams.tag`: the builder image's tag. */
  readonly kanikoTag?: string;
  /** Hash of everything that defines the build; another value re-runs it. */
  readonly fingerprint: string;
}

export type BuildOutcome =
  /** Started or still running. */
  | { readonly state: 'Running'; readonly reason: string }
  /** Finished; `pushed` says whether the image is now at `image`. */
  | { readonly state: 'Succeeded'; readonly image: string; readonly pushed: boolean; readonly reason: string }
  /** The build failed (`BuildFailed`, `BuildTimedOut`, ...): a reason the Module's owner can act on. */
  | { readonly state: 'Failed'; readonly code: string; readonly reason: string }
  /** No builder can run here (`BuilderUnavailable`): never counted as passed. */
  | { readonly state: 'Unavailable'; readonly code: string; readonly reason: string }
  /** The build could not be started or observed (API unreachable, ...): worth retrying. */
  | { readonly state: 'Error'; readonly code: string; readonly reason: string };

export interface Builder {
  /** `job` or `local`, for logs and metrics. */
  readonly kind: string;
  run(request: BuildRequest, signal?: AbortSignal): Promise<BuildOutcome>;
  /** The outcome of `key` is recorded: remove what its build left. */
  release(key: string): Promise<void>;
  /** `listener(key)` is called when the state of `key`'s build may have changed. */
  onUpdate(listener: (key: string) => void): void;
  close(): Promise<void>;
}

/** The last lines of a build log, at most `maxBytes` bytes of them (whole lines where possible). */
export function logTail(log: string, maxLines = 20, maxBytes = 2048): string {
  const lines = log.replace(/\r\n?/g, '\n').replace(/\n+$/, '').split('\n');
  let out = lines.slice(-maxLines).join('\n');
  if (Buffer.byteLength(out) > maxBytes) {
    const buf = Buffer.from(out);
    out = buf.subarray(buf.length - maxBytes).toString('utf8').replace(/^\uFFFD+/, '');
    const nl = out.indexOf('\n');
    if (nl >= 0 && nl < out.length - 1) out = out.slice(nl + 1);
    out = `…${out}`;
  }
  return out;
}
