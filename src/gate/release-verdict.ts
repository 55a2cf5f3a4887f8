/**
 * Whether a release is safe for the cluster's Modules: the verdict of the PreflightValidationOCP
 * that validates it, judged against the Modules that exist now. Pure and in memory; what is costly
 * (the per-object index of `status.modules`, the pass over every Module) is cached per
 * {@link GateInputs}, keyed by each object's resourceVersion and by the identity of the Modules
 * array, so a repeated decision costs a few map look-ups.
 *
 * Decisions where the issue is silent (what a cluster administrator would expect):
 * - Matching is by digest only, whatever the repository: a release mirrored to another registry
 *   (disconnected clusters) has the same digest and the same content. A reference with both a
 *   tag and a digest is its digest. A tag is looked up through `digestOf` with the reference as
 *   written, on both sides; an unknown digest never matches and the verdict says it is not known yet.
 * - No Modules at all: verified, whether or not a validation exists — nothing can fail to load.
 * - Several matching objects: the newest (`creationTimestamp`, then the greater name) wins, but
 *   an object being deleted is chosen only when every match is being deleted (it is about to go,
 *   and the verdict should not flip back once it has gone).
 * - `useRTKernel` is not considered: the gate cannot know which kernel the nodes will boot
 *   (MachineConfigs decide), and an administrator validating the RT kernel means that one.
 * - A Module with an entry is judged by the entry alone. Comparing the Module's creationTimestamp
 *   with the entry's lastTransitionTime would catch a re-created Module, but the two clocks differ
 *   (kube-apiserver's and this server's) and a True entry is not re-validated, so a few seconds of
 *   skew would refuse upgrades for good; the controller drops the entries of deleted Modules, so
 *   a re-created Module starts without one anyway.
 */
import type { KubeObject } from '../api/resources.ts';
import { API_VERSION, type Condition, type ModuleStatus } from '../api/schema.ts';
import { parseImageReference, type ImageReference } from '../image/reference.ts';

/** What the gate reads of a Module; a `KmmModule` is one. */
export interface GateModule {
  readonly metadata: {
    readonly name: string;
    readonly namespace?: string;
    /** RFC 3339; only used to explain why a Module without an entry is not verified. */
    readonly creationTimestamp?: string;
  };
}

export interface GateInputs {
  /** Current PreflightValidationOCP objects (as stored). */
  validations(): readonly KubeObject[];
  /**
   * Current Modules, with `metadata.creationTimestamp` when known. Return the same array while the
   * Modules do not change: the pass over them is cached by the array's identity.
   */
  modules(): readonly GateModule[];
  /**
   * Digest (`sha256:...`) of an image reference (as written) known from earlier resolution, e.g. a
   * PreflightValidationOCP's tag; undefined when not known yet. Must not block; an implementation
   * may take a miss as a request to resolve the tag in the background.
   */
  digestOf(image: string): string | undefined;
}

export type VerdictReason =
  /** Every current Module has a True entry in the matching object. */
  | 'AllModulesVerified'
  /** There are no Modules. */
  | 'NoModules'
  /** The matching object lacks a True entry for at least one current Module. */
  | 'ModulesNotVerified'
  /** No PreflightValidationOCP names the release (by digest). */
  | 'NoValidation'
  /** The release is a tag whose digest is not known yet. */
  | 'ReleaseDigestUnknown'
  /** Nothing matched, but some objects name tags whose digest is not known yet. */
  | 'ValidationDigestUnknown'
  /** The matching object's status is not for its current generation (re-validating, or not started). */
  | 'ValidationOutdated'
  /** The matching object is being deleted. */
  | 'ValidationDeleting'
  /** The release is not an image reference. */
  | 'InvalidReleaseImage';

export interface FailingModule {
  readonly namespace: string;
  readonly name: string;
  /** Why it is not verified, at most {@link MAX_REASON_CHARS} characters. */
  readonly reason: string;
}

export interface ReleaseVerdict {
  readonly verified: boolean;
  /** The release asked about, as given. */
  readonly release: string;
  /** The release's digest, when known. */
  readonly digest?: string;
  /** Name of the PreflightValidationOCP the verdict comes from. */
  readonly validation?: string;
  readonly reason: VerdictReason;
  /** One or two sentences: what the verdict is and why. */
  readonly message: string;
  /** How to get to a verified release; empty when verified. */
  readonly remedy: string;
  /**
   * Failing Modules, the worst first (False, then Error, then without a verdict), then by
   * namespace/name; at most {@link MAX_FAILING_LISTED}.
   */
  readonly failing: readonly FailingModule[];
  /** How many current Modules are not verified: all of them when no current verdict of an object applies. */
  readonly failingCount: number;
  /** How many current Modules there are. */
  readonly moduleCount: number;
  /** The matching object's own explanation, when its Verified condition is not about Modules (e.g. the kernel could not be resolved). */
  readonly note?: string;
}

export const MAX_FAILING_LISTED = 10;
export const MAX_REASON_CHARS = 200;

export interface VerdictContext {
  /** The release's version, when known (names the suggested PreflightValidationOCP). */
  readonly version?: string;
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

interface Evaluation {
  readonly modules: readonly GateModule[];
  readonly failing: readonly FailingModule[];
  readonly failingCount: number;
}

interface ValidationInfo {
  readonly object: KubeObject;
  readonly resourceVersion: string | undefined;
  readonly name: string;
  readonly releaseImage: string | undefined;
  /** Undefined when `releaseImage` is missing or invalid (the schema prevents both). */
  readonly ref: ImageReference | undefined;
  readonly created: number;
  readonly deleting: boolean;
  readonly generation: number;
  readonly observedGeneration: number | undefined;
  readonly verified: Condition | undefined;
  /** Built on first use: only the chosen object is indexed. */
  entries?: ReadonlyMap<string, ModuleStatus>;
  evaluation?: Evaluation;
}

interface GateCache {
  readonly objects: Map<string, ValidationInfo>;
  readonly refs: Map<string, ImageReference | Error>;
  indexBuilds: number;
  evaluations: number;
}

export interface GateCacheStats {
  /** How many times an object's `status.modules` was indexed. */
  readonly indexBuilds: number;
  /** How many times every current Module was checked against an object. */
  readonly evaluations: number;
  /** Objects held. */
  readonly objects: number;
}

const caches = new WeakMap<GateInputs, GateCache>();
const MAX_CACHED_REFS = 256;

function cacheOf(inputs: GateInputs): GateCache {
  let c = caches.get(inputs);
  if (!c) caches.set(inputs, (c = { objects: new Map(), refs: new Map(), indexBuilds: 0, evaluations: 0 }));
  return c;
}

/** Work done by the cache of `inputs` so far, for metrics and tests. */
export function gateCacheStats(inputs: GateInputs): GateCacheStats {
  const c = cacheOf(inputs);
  return { indexBuilds: c.indexBuilds, evaluations: c.evaluations, objects: c.objects.size };
}

function parseRef(cache: GateCache, image: string): ImageReference | Error {
  let r = cache.refs.get(image);
  if (r === undefined) {
    try {
      r = parseImageReference(image);
    } catch (err) {
      r = err as Error;
    }
    if (cache.refs.size >= MAX_CACHED_REFS) cache.refs.clear();
    cache.refs.set(image, r);
  }
  return r;
}

const time = (s: unknown): number => {
  const t = typeof s === 'string' ? Date.parse(s) : NaN;
  return Number.isNaN(t) ? -Infinity : t;
};

function infoOf(cache: GateCache, obj: KubeObject): ValidationInfo {
  const key = obj.metadata.uid ?? obj.metadata.name ?? '';
  const rv = obj.metadata.resourceVersion;
  const held = cache.objects.get(key);
  if (held && (held.object === obj || (rv !== undefined && held.resourceVersion === rv))) return held;
  const spec = obj.spec ?? {};
  const releaseImage = typeof spec['releaseImage'] === 'string' ? spec['releaseImage'] : undefined;
  const parsed = releaseImage !== undefined ? parseRef(cache, releaseImage) : undefined;
  const info: ValidationInfo = {
    object: obj,
    resourceVersion: rv,
    name: obj.metadata.name ?? '',
    releaseImage,
    ref: parsed instanceof Error ? undefined : parsed,
    created: time(obj.metadata.creationTimestamp),
    deleting: typeof obj.metadata.deletionTimestamp === 'string' && obj.metadata.deletionTimestamp !== '',
    generation: obj.metadata.generation ?? 1,
    observedGeneration: obj.status?.observedGeneration,
    verified: obj.status?.conditions?.find((c) => c.type === 'Verified'),
  };
  cache.objects.set(key, info);
  return info;
}

function entriesOf(cache: GateCache, info: ValidationInfo): ReadonlyMap<string, ModuleStatus> {
  if (!info.entries) {
    cache.indexBuilds++;
    const m = new Map<string, ModuleStatus>();
    for (const e of info.object.status?.modules ?? []) m.set(`${e.namespace}/${e.name}`, e);
    info.entries = m;
  }
  return info.entries;
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

export const cut = (s: string, max: number): string => (s.length <= max ? s : `${s.slice(0, Math.max(0, max - 1))}…`);
const oneLine = (s: string) => s.replace(/\s+/g, ' ').trim();

function evaluate(cache: GateCache, info: ValidationInfo, modules: readonly GateModule[]): Evaluation {
  if (info.evaluation?.modules === modules) return info.evaluation;
  cache.evaluations++;
  const entries = entriesOf(cache, info);
  const since = info.verified ? time(info.verified.lastTransitionTime) : -Infinity;
  // Worst first: a failure says more than an error, which says more than a missing verdict.
  const buckets: { key: string; f: FailingModule }[][] = [[], [], []];
  for (const m of modules) {
    const namespace = m.metadata.namespace ?? '';
    const name = m.metadata.name;
    const key = `${namespace}/${name}`;
    const e = entries.get(key);
    if (e?.verificationStatus === 'True') continue;
    let rank: number;
    let reason: string;
    if (e?.verificationStatus === 'False') {
      rank = 0;
      reason = oneLine(e.statusReason ?? '') || 'verification failed';
    } else if (e?.verificationStatus === 'Error') {
      rank = 1;
      reason = `error (retried): ${oneLine(e.statusReason ?? '') || 'no reason given'}`;
    } else if (e) {
      rank = 2;
      reason = `pending (stage ${e.verificationStage})${e.statusReason ? `: ${oneLine(e.statusReason)}` : ''}`;
    } else {
      rank = 2;
      const created = m.metadata.creationTimestamp;
      reason =
        info.verified && time(created) > since
          ? `created after the validation (${created}), not validated yet`
          : 'not validated yet';
    }
    buckets[rank]!.push({ key, f: { namespace, name, reason: cut(reason, MAX_REASON_CHARS) } });
  }
  const failingCount = buckets[0]!.length + buckets[1]!.length + buckets[2]!.length;
  const listed: FailingModule[] = [];
  for (const b of buckets) {
    if (listed.length >= MAX_FAILING_LISTED) break;
    b.sort((x, y) => (x.key < y.key ? -1 : x.key > y.key ? 1 : 0));
    for (const { f } of b.slice(0, MAX_FAILING_LISTED - listed.length)) listed.push(f);
  }
  info.evaluation = { modules, failing: listed, failingCount };
  return info.evaluation;
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

const MODULE_REASONS = new Set(['AllModulesVerified', 'NoModules', 'ModulesFailed', 'ModulesErrored', 'ModulesPending']);

/** A DNS-1123 name for a new PreflightValidationOCP for `release`. */
export function suggestedName(release: string, version?: string): string {
  const clean = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-+|-+$/g, '');
  const short = (s: string) => s.slice(0, 63).replace(/-+$/, '');
  if (version && clean(version)) return short(`ocp-${clean(version)}`);
  const at = release.indexOf('@');
  const digest = at === -1 ? undefined : release.slice(at + 1);
  if (digest) return `ocp-release-${clean(digest.slice(digest.indexOf(':') + 1)).slice(0, 12)}`;
  const tag = /:([\w][\w.-]*)$/.exec(release)?.[1];
  return tag && clean(tag) ? short(`ocp-${clean(tag)}`) : 'ocp-release';
}

/** A shell line that creates the PreflightValidationOCP for `release` and waits for its verdict. */
export function createCommand(release: string, version?: string): string {
  const name = suggestedName(release, version);
  const obj = { apiVersion: API_VERSION, kind: 'PreflightValidationOCP', metadata: { name }, spec: { releaseImage: release } };
  // JSON of an image reference never holds a single quote, so it is safe inside one.
  return `echo '${JSON.stringify(obj)}' | kubectl apply -f - && kubectl wait pfvo/${name} --for=condition=Verified --timeout=2h`;
}

/**
 * The verdict's message with reasons cut to `reasonChars`: callers with a size budget (an
 * AdmissionReview message, a condition) shorten the reasons before anything else.
 */
export function describeVerdict(v: ReleaseVerdict, reasonChars = MAX_REASON_CHARS, listed = 3): string {
  if (v.reason !== 'ModulesNotVerified') return v.message;
  const shown = v.failing.slice(0, listed).map((f) => `${f.namespace}/${f.name}: ${cut(f.reason, reasonChars)}`);
  const more = v.failingCount - shown.length;
  const list = shown.join('; ') + (more > 0 ? `; and ${more} more` : '');
  const note = v.note ? ` (the object's Verified condition says: ${cut(v.note, reasonChars)})` : '';
  return `PreflightValidationOCP ${v.validation} has ${v.failingCount} of ${v.moduleCount} Modules not verified: ${list}${note}`;
}

// ---------------------------------------------------------------------------------------------
// The verdict
// ---------------------------------------------------------------------------------------------

type Base = Pick<ReleaseVerdict, 'release' | 'digest' | 'moduleCount'>;

function refused(base: Base, reason: VerdictReason, message: string, remedy: string, extra: Partial<ReleaseVerdict> = {}): ReleaseVerdict {
  return { ...base, verified: false, reason, message, remedy, failing: [], failingCount: base.moduleCount, ...extra };
}

const digestFrom = (ref: ImageReference, written: string, inputs: GateInputs): string | undefined =>
  ref.digest ?? inputs.digestOf(written);

/**
 * The verdict for a release (image reference by digest or tag). Pure, in memory; after the first
 * call for unchanged objects and Modules, a few map look-ups.
 */
export function releaseVerdict(release: string, inputs: GateInputs, context: VerdictContext = {}): ReleaseVerdict {
  const cache = cacheOf(inputs);
  const modules = inputs.modules();
  const parsed = parseRef(cache, release);
  const base0: Base = { release, moduleCount: modules.length };
  if (parsed instanceof Error) {
    return refused(base0, 'InvalidReleaseImage', `the release ${JSON.stringify(cut(release, 300))} is not an image reference: ${parsed.message}`, 'name the release by a valid pull spec (registry/repository@sha256:<digest>)');
  }
  const digest = digestFrom(parsed, release, inputs);
  const base: Base = digest ? { ...base0, digest } : base0;
  if (modules.length === 0) {
    return { ...base, verified: true, reason: 'NoModules', message: 'the cluster has no Modules, so none can fail to load', remedy: '', failing: [], failingCount: 0 };
  }
  if (!digest) {
    return refused(
      base,
      'ReleaseDigestUnknown',
      `the digest of the release image tag ${release} is not known yet, so no PreflightValidationOCP can be matched to it`,
      'retry in a minute (the server resolves tags in the background), or name the release by digest (@sha256:...)',
    );
  }

  const objects = inputs.validations();
  const seen = new Set<string>();
  let best: ValidationInfo | undefined;
  const unknownTags: string[] = [];
  for (const obj of objects) {
    const info = infoOf(cache, obj);
    seen.add(obj.metadata.uid ?? obj.metadata.name ?? '');
    if (!info.ref || info.releaseImage === undefined) continue;
    const d = digestFrom(info.ref, info.releaseImage, inputs);
    if (d === undefined) {
      unknownTags.push(info.name);
      continue;
    }
    if (d !== digest) continue;
    if (
      !best ||
      (best.deleting && !info.deleting) ||
      (best.deleting === info.deleting && (info.created > best.created || (info.created === best.created && info.name > best.name)))
    ) {
      best = info;
    }
  }
  // Forget objects that are gone, so the cache holds what is stored and no more.
  if (cache.objects.size > seen.size) for (const k of cache.objects.keys()) if (!seen.has(k)) cache.objects.delete(k);

  if (!best) {
    const create = createCommand(release, context.version);
    if (unknownTags.length > 0) {
      const names = unknownTags.sort().slice(0, 3).join(', ') + (unknownTags.length > 3 ? ` and ${unknownTags.length - 3} more` : '');
      return refused(
        base,
        'ValidationDigestUnknown',
        `no PreflightValidationOCP is known to validate release ${release}: the digest of the release image tag of ${names} is not known yet`,
        `retry in a minute (the server resolves tags in the background), or create one naming this release: ${create}`,
      );
    }
    return refused(base, 'NoValidation', `no PreflightValidationOCP validates release ${release}`, `create one: ${create}`);
  }

  const named = { validation: best.name };
  const waitCmd = `kubectl wait pfvo/${best.name} --for=condition=Verified --timeout=2h`;
  if (best.deleting) {
    return refused(base, 'ValidationDeleting', `PreflightValidationOCP ${best.name} is being deleted`, `create a new one: ${createCommand(release, context.version)}`, named);
  }
  if (best.observedGeneration !== best.generation) {
    const what = best.observedGeneration === undefined ? 'has not started validating yet' : `is validating its changed spec (generation ${best.generation}, status for ${best.observedGeneration})`;
    return refused(base, 'ValidationOutdated', `PreflightValidationOCP ${best.name} ${what}`, `wait for it: ${waitCmd}`, named);
  }

  const ev = evaluate(cache, best, modules);
  if (ev.failingCount === 0) {
    return {
      ...base,
      ...named,
      verified: true,
      reason: 'AllModulesVerified',
      message: `PreflightValidationOCP ${best.name} has all ${modules.length} Modules verified`,
      remedy: '',
      failing: [],
      failingCount: 0,
    };
  }
  const cond = best.verified;
  const note = cond && cond.status !== 'True' && !MODULE_REASONS.has(cond.reason) ? cut(oneLine(`${cond.reason}: ${cond.message}`), MAX_REASON_CHARS) : undefined;
  const v: ReleaseVerdict = {
    ...base,
    ...named,
    verified: false,
    reason: 'ModulesNotVerified',
    message: '',
    remedy: `see every Module's status with kubectl get pfvo ${best.name} -o yaml, fix the failing Modules (or wait for pending ones), then ${waitCmd}`,
    failing: ev.failing,
    failingCount: ev.failingCount,
    ...(note ? { note } : {}),
  };
  return { ...v, message: describeVerdict(v) };
}
