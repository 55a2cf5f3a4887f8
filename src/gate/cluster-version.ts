/**
 * The part of OpenShift's `config.openshift.io/v1` `ClusterVersion` the upgrade gate reads, and
 * what an update of it asks for: which release the cluster is told to move to, if any.
 *
 * `spec.desiredUpdate` rules (openshift/api config/v1 types_cluster_version.go): `image` wins over
 * `version`; a `version` alone is turned into an image by the CVO through the update graph, which
 * the object mirrors in `status.availableUpdates` and `status.conditionalUpdates[].release`.
 */

export const CLUSTER_VERSION_GROUP = 'config.openshift.io';
export const CLUSTER_VERSION_VERSION = 'v1';
export const CLUSTER_VERSION_RESOURCE = 'clusterversions';

export interface Release {
  readonly version?: string;
  readonly image?: string;
  readonly url?: string;
  readonly channels?: readonly string[];
}

export interface DesiredUpdate {
  readonly architecture?: string;
  readonly version?: string;
  readonly image?: string;
  readonly force?: boolean;
  /** `Preflight`: run the CVO's update preflight checks only, without updating. */
  readonly mode?: string;
}

export interface ConditionalUpdate {
  readonly release: Release;
  readonly risks?: readonly Readonly<Record<string, unknown>>[];
  readonly conditions?: readonly Readonly<Record<string, unknown>>[];
}

export interface ClusterVersion {
  readonly apiVersion?: string;
  readonly kind?: string;
  readonly metadata?: Readonly<Record<string, unknown>>;
  readonly spec?: {
    readonly clusterID?: string;
    readonly channel?: string;
    readonly upstream?: string;
    readonly desiredUpdate?: DesiredUpdate | null;
    readonly [field: string]: unknown;
  };
  readonly status?: {
    readonly desired?: Release;
    readonly history?: readonly Readonly<Record<string, unknown>>[];
    readonly availableUpdates?: readonly Release[] | null;
    readonly conditionalUpdates?: readonly ConditionalUpdate[] | null;
    readonly [field: string]: unknown;
  };
}

/** What an update of a ClusterVersion asks for, as far as the gate is concerned. */
export type UpdateRequest =
  /** Nothing to gate: `why` says which always-allowed case this is. */
  | { readonly kind: 'ungated'; readonly why: 'cleared' | 'preflight' | 'unchanged' | 'no-target' }
  /** An update to `image` (`version` when the request named one). */
  | {
      readonly kind: 'target';
      readonly image: string;
      readonly version?: string;
      readonly force: boolean;
      readonly via: 'image' | 'availableUpdates' | 'conditionalUpdates';
    }
  /** A `version` that neither status lists. */
  | { readonly kind: 'unresolved'; readonly version: string; readonly force: boolean }
  /** The object is not a ClusterVersion the gate can read (kube-apiserver's schema forbids it). */
  | { readonly kind: 'invalid'; readonly message: string };

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const nonEmpty = (v: unknown): string | undefined => (typeof v === 'string' && v !== '' ? v : undefined);

function desiredUpdateOf(obj: unknown): { present: false } | { present: true; value: unknown } {
  const spec = isObject(obj) ? obj['spec'] : undefined;
  const du = isObject(spec) ? spec['desiredUpdate'] : undefined;
  return du === undefined || du === null ? { present: false } : { present: true, value: du };
}

/** The image the status lists for `version`: available updates first, then conditional ones. */
function lookUp(obj: unknown, version: string): { image: string; via: 'availableUpdates' | 'conditionalUpdates' } | undefined {
  const status = isObject(obj) ? obj['status'] : undefined;
  if (!isObject(status)) return undefined;
  const available = status['availableUpdates'];
  if (Array.isArray(available)) {
    for (const r of available) {
      const image = isObject(r) && r['version'] === version ? nonEmpty(r['image']) : undefined;
      if (image) return { image, via: 'availableUpdates' };
    }
  }
  const conditional = status['conditionalUpdates'];
  if (Array.isArray(conditional)) {
    for (const c of conditional) {
      const r = isObject(c) ? c['release'] : undefined;
      const image = isObject(r) && r['version'] === version ? nonEmpty(r['image']) : undefined;
      if (image) return { image, via: 'conditionalUpdates' };
    }
  }
  return undefined;
}

interface Target {
  readonly image?: string;
  readonly version?: string;
  readonly architecture?: string;
}

function resolve(t: Target, newObject: unknown, oldObject: unknown) {
  if (t.image) return { image: t.image, via: 'image' as const };
  if (!t.version) return undefined;
  return lookUp(newObject, t.version) ?? lookUp(oldObject, t.version);
}

/**
 * What an UPDATE from `oldObject` to `newObject` asks for. Cheap when nothing is asked: the
 * desired updates are compared before anything is resolved.
 *
 * The same target as before (same image, version and architecture, or both resolving to the same
 * image) is no change, whatever else changed (e.g. only `force`): the gate judges moves to a new
 * release, and the release already asked for was judged when it was asked for. A previous
 * `mode: Preflight` request does not count as asked for: dropping the mode starts the update.
 */
export function updateRequest(oldObject: unknown, newObject: unknown): UpdateRequest {
  const next = desiredUpdateOf(newObject);
  if (!next.present) return { kind: 'ungated', why: 'cleared' };
  if (!isObject(next.value)) return { kind: 'invalid', message: 'spec.desiredUpdate of the new object must be an object' };
  const du = next.value;
  if (du['mode'] === 'Preflight') return { kind: 'ungated', why: 'preflight' };
  const target: Target = { image: nonEmpty(du['image']), version: nonEmpty(du['version']), architecture: nonEmpty(du['architecture']) };
  if (!target.image && !target.version) return { kind: 'ungated', why: 'no-target' };

  const prev = desiredUpdateOf(oldObject);
  const before: Target | undefined =
    prev.present && isObject(prev.value) && prev.value['mode'] !== 'Preflight'
      ? { image: nonEmpty(prev.value['image']), version: nonEmpty(prev.value['version']), architecture: nonEmpty(prev.value['architecture']) }
      : undefined;
  if (before && before.image === target.image && before.version === target.version && before.architecture === target.architecture) {
    return { kind: 'ungated', why: 'unchanged' };
  }

  const force = du['force'] === true;
  const resolved = resolve(target, newObject, oldObject);
  if (!resolved) return { kind: 'unresolved', version: target.version!, force };
  if (before && resolve(before, newObject, oldObject)?.image === resolved.image) return { kind: 'ungated', why: 'unchanged' };
  return { kind: 'target', image: resolved.image, ...(target.version ? { version: target.version } : {}), force, via: resolved.via };
}
