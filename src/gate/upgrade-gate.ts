/**
 * The ClusterVersion upgrade gate (DESIGN.md §5, issue 7): a validating admission decision on
 * `config.openshift.io/v1` `clusterversions` that lets `spec.desiredUpdate` move to a new release
 * only when a PreflightValidationOCP for that release has every current Module verified. This
 * module is the pure decision and the AdmissionReview v1 handling; the HTTP route, the
 * ClusterOperator and the manifests are wired elsewhere against it.
 *
 * What is gated: an UPDATE of the ClusterVersion itself (not a subresource) whose desired update
 * asks for a release it did not ask for before (see {@link updateRequest}). Always allowed,
 * without reading any PreflightValidationOCP: CREATE, DELETE, CONNECT; other resources (a
 * misconfigured webhook must not block what it does not understand); status updates; updates
 * leaving the target as it was (other fields, or only `force`, changed); clearing the update; a
 * desired update with neither image nor version (the CVO reports it itself); `mode: Preflight`.
 *
 * The target is `desiredUpdate.image`, else `desiredUpdate.version` looked up in the new object's
 * `status.availableUpdates` then `status.conditionalUpdates[].release`, then in the old object's.
 * A version found nowhere cannot be judged and is treated like an unverified release (refused
 * under `enforce`), saying so; the CVO itself would not know where to go either.
 *
 * Policy: under `enforce` a refusal is `allowed: false`, code 403, reason Forbidden, with one
 * message (at most {@link MAX_MESSAGE_BYTES} bytes: kube-apiserver shows it as is) naming the
 * release, the PreflightValidationOCP, up to 3 failing Modules with their reasons, how many more,
 * how to fix it, and whether `desiredUpdate.force` overrides. Under `warn` the same text is sent
 * as AdmissionReview warnings (each under 256 characters, at most {@link MAX_WARNINGS}) and the
 * update is allowed. With `honourForce`, `desiredUpdate.force: true` allows an unverified update
 * with a warning that the gate was bypassed; without it force changes nothing. Every judged update
 * carries audit annotations (release, verdict, decision), so bypasses can be found in the audit log.
 *
 * Failure: a malformed AdmissionReview is answered 400 with a `Status` saying what is wrong; an
 * exception while deciding fails closed (`allowed: false`, code 500, a message saying the gate
 * failed internally and to retry or read the server's log), except under `warn` or with a force
 * the policy honours, which allow with a warning. The exception is handed back in
 * {@link AdmissionOutcome.error} for the caller to log.
 */
import type { Status } from '../server/errors.ts';
import {
  admissionReviewResponse,
  badAdmissionReview,
  readAdmissionReview,
  type AdmissionDecision,
  type AdmissionRequest,
  type AdmissionReviewResponse,
} from './admission-review.ts';
import { CLUSTER_VERSION_GROUP, CLUSTER_VERSION_RESOURCE, updateRequest } from './cluster-version.ts';
import { cut, describeVerdict, releaseVerdict, type GateInputs, type ReleaseVerdict } from './release-verdict.ts';

export { gateCacheStats, releaseVerdict, MAX_FAILING_LISTED, MAX_REASON_CHARS } from './release-verdict.ts';
export type { FailingModule, GateCacheStats, GateInputs, GateModule, ReleaseVerdict, VerdictContext, VerdictReason } from './release-verdict.ts';

/** Where the server serves the ClusterVersion webhook (deploy/components/openshift names it). */
export const CLUSTER_VERSION_WEBHOOK_PATH = '/admission/clusterversions';

export type GatePolicy = {
  /** `enforce`: refuse unverified updates; `warn`: allow them with warnings. */
  readonly mode: 'enforce' | 'warn';
  /** Whether `spec.desiredUpdate.force: true` lets an unverified update through (with a warning). */
  readonly honourForce: boolean;
};

export interface AdmissionOutcome {
  /** 200 with an AdmissionReview, or 400 with a Status for a malformed review. */
  readonly status: 200 | 400;
  readonly body: AdmissionReviewResponse | Status;
  /** An exception caught while deciding (the answer then fails closed); for the caller's log. */
  readonly error?: unknown;
}

export const MAX_MESSAGE_BYTES = 1024;
export const MAX_WARNING_CHARS = 255;
export const MAX_WARNINGS = 6;

const SOURCE = 'kmm-preflight';
const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const bytes = (s: string) => Buffer.byteLength(s, 'utf8');

/** What stands between the update and the release, in parts that a message or warnings are made of. */
interface Refusal {
  /** The release as the user knows it: the version when named, else the image. */
  readonly label: string;
  /** The full release: `version (image)` or the image. */
  readonly fullLabel: string;
  /** What is wrong, with module reasons cut to `reasonChars`. */
  readonly describe: (reasonChars: number) => string;
  /** The same, split for warnings: a headline and one part per listed Module. */
  readonly parts: readonly string[];
  readonly remedy: string;
  readonly audit: Readonly<Record<string, string>>;
}

function refusalOf(v: ReleaseVerdict, version: string | undefined): Refusal {
  const parts =
    v.reason === 'ModulesNotVerified'
      ? [
          `PreflightValidationOCP ${v.validation} has ${v.failingCount} of ${v.moduleCount} Modules not verified${v.note ? ` (its Verified condition says: ${v.note})` : ''}`,
          ...v.failing.slice(0, 3).map((f, i, shown) => {
            const more = v.failingCount - shown.length;
            return `${f.namespace}/${f.name}: ${f.reason}${i === shown.length - 1 && more > 0 ? `; and ${more} more` : ''}`;
          }),
        ]
      : [v.message];
  return {
    label: version ?? v.release,
    fullLabel: version ? `${version} (${v.release})` : v.release,
    describe: (n) => describeVerdict(v, n),
    parts,
    remedy: v.remedy,
    audit: { release: v.release, verdict: v.reason, ...(v.validation ? { validation: v.validation } : {}) },
  };
}

function unresolvedRefusal(version: string, clusterVersion: string): Refusal {
  const message = `spec.desiredUpdate.version ${version} is not among the available or conditional updates of ClusterVersion ${clusterVersion}, so its release image is not known`;
  return {
    label: version,
    fullLabel: version,
    describe: () => message,
    parts: [message],
    remedy: 'pick a listed version (oc adm upgrade shows them) or set spec.desiredUpdate.image to the release pull spec by digest',
    audit: { version, verdict: 'VersionNotListed' },
  };
}

/**
 * `text` in pieces of at most `max` characters, split where a reader expects a break: after a
 * colon, between the commands of a shell line, between list items, then at a space.
 */
function chunks(text: string, max: number): string[] {
  const rest = text.trim();
  if (rest.length <= max) return rest ? [rest] : [];
  for (const sep of [': ', ' && ', '; ', ' | ', ' ']) {
    const at = rest.lastIndexOf(sep, max - sep.trimEnd().length);
    if (at >= 16) return [rest.slice(0, at + sep.trimEnd().length), ...chunks(rest.slice(at + sep.length), max)];
  }
  return [rest.slice(0, max), ...chunks(rest.slice(max), max)];
}

/** Warnings: the headline joined to the first part when they fit together, every piece short. */
function warningsOf(headline: string, parts: readonly string[]): string[] {
  const [first, ...others] = parts;
  const joined = first !== undefined && headline.length + 2 + first.length <= MAX_WARNING_CHARS ? [`${headline}: ${first}`, ...others] : [headline, ...parts];
  const all = joined.flatMap((p) => chunks(p, MAX_WARNING_CHARS));
  if (all.length <= MAX_WARNINGS) return all;
  const kept = all.slice(0, MAX_WARNINGS);
  kept[MAX_WARNINGS - 1] = cut(`${kept[MAX_WARNINGS - 1]} …(more in the PreflightValidationOCP's status)`, MAX_WARNING_CHARS);
  return kept;
}

function cutBytes(s: string, max: number): string {
  if (bytes(s) <= max) return s;
  let t = s.slice(0, max);
  while (bytes(t) > max - 3) t = t.slice(0, -1);
  return `${t}…`;
}

/** The one refusal message, within {@link MAX_MESSAGE_BYTES}: module reasons shrink first. */
function refusalMessage(r: Refusal, policy: GatePolicy): string {
  const override = policy.honourForce
    ? 'To override, set spec.desiredUpdate.force: true.'
    : 'spec.desiredUpdate.force does not bypass this gate.';
  const compose = (detail: string) => `${SOURCE} refuses the update to ${r.fullLabel}: ${detail}. To fix: ${r.remedy}. ${override}`;
  for (const n of [200, 120, 60, 30]) {
    const m = compose(r.describe(n));
    if (bytes(m) <= MAX_MESSAGE_BYTES) return m;
  }
  // Very long names or references: the detail gives way, then (absurd references) everything.
  const fixed = bytes(compose(''));
  const room = MAX_MESSAGE_BYTES - fixed;
  return cutBytes(room > 80 ? compose(cutBytes(r.describe(30), room)) : compose(r.describe(30)), MAX_MESSAGE_BYTES);
}

function judge(r: Refusal, force: boolean, policy: GatePolicy): AdmissionDecision {
  if (force && policy.honourForce) {
    return {
      allowed: true,
      warnings: warningsOf(`${SOURCE}: gate bypassed by spec.desiredUpdate.force for the update to ${r.label}`, [...r.parts, `To fix: ${r.remedy}`]),
      auditAnnotations: { ...r.audit, decision: 'forced' },
    };
  }
  if (policy.mode === 'warn') {
    return {
      allowed: true,
      warnings: warningsOf(`${SOURCE} (warn mode) would refuse the update to ${r.label}`, [...r.parts, `To fix: ${r.remedy}`]),
      auditAnnotations: { ...r.audit, decision: 'warned' },
    };
  }
  return { allowed: false, code: 403, message: refusalMessage(r, policy), auditAnnotations: { ...r.audit, decision: 'denied' } };
}

const ALLOWED: AdmissionDecision = { allowed: true };

function gates(req: AdmissionRequest): boolean {
  return (
    req.operation === 'UPDATE' &&
    req.resource.group === CLUSTER_VERSION_GROUP &&
    req.resource.resource === CLUSTER_VERSION_RESOURCE &&
    (req.subResource === undefined || req.subResource === '')
  );
}

/** The decision, or the reason the request cannot be judged (answered 400). */
function decide(req: AdmissionRequest, inputs: GateInputs, policy: GatePolicy): AdmissionDecision | { readonly bad: string } {
  if (!gates(req)) return ALLOWED;
  const u = updateRequest(req.oldObject, req.object);
  switch (u.kind) {
    case 'invalid':
      return { bad: `request.object: ${u.message}` };
    case 'ungated':
      return ALLOWED;
    case 'unresolved':
      return judge(unresolvedRefusal(u.version, req.name ?? 'version'), u.force, policy);
    case 'target': {
      const v = releaseVerdict(u.image, inputs, u.version ? { version: u.version } : {});
      if (v.verified) {
        return { allowed: true, auditAnnotations: { release: u.image, verdict: v.reason, ...(v.validation ? { validation: v.validation } : {}), decision: 'allowed' } };
      }
      return judge(refusalOf(v, u.version), u.force, policy);
    }
  }
}

function forceOf(req: AdmissionRequest): boolean {
  try {
    const spec = isObject(req.object) ? req.object['spec'] : undefined;
    const du = isObject(spec) ? spec['desiredUpdate'] : undefined;
    return isObject(du) && du['force'] === true;
  } catch {
    return false;
  }
}

/** The answer when deciding threw: closed, unless the policy lets the update through anyway. */
function failed(req: AdmissionRequest, error: unknown, policy: GatePolicy): AdmissionDecision {
  const why = cut((error instanceof Error ? error.message : String(error)).replace(/\s+/g, ' '), 200);
  const audit = { verdict: 'InternalError' };
  if (policy.honourForce && forceOf(req)) {
    return {
      allowed: true,
      warnings: warningsOf(`${SOURCE}: gate bypassed by spec.desiredUpdate.force; the gate failed internally and did not check this update`, [why]),
      auditAnnotations: { ...audit, decision: 'forced' },
    };
  }
  if (policy.mode === 'warn') {
    return {
      allowed: true,
      warnings: warningsOf(`${SOURCE} (warn mode): the gate failed internally and did not check this update; see the server's log`, [why]),
      auditAnnotations: { ...audit, decision: 'warned' },
    };
  }
  return {
    allowed: false,
    code: 500,
    message: `${SOURCE} failed internally while checking this update (${why}), so it is refused to be safe. Retry the update; if it keeps failing, check the ${SOURCE} server's log.`,
    auditAnnotations: { ...audit, decision: 'denied' },
  };
}

/** Handles one AdmissionReview v1 request body (already JSON-parsed, unknown shape) for `config.openshift.io/v1` `clusterversions`. */
export function reviewClusterVersionUpdate(body: unknown, inputs: GateInputs, policy: GatePolicy): AdmissionOutcome {
  let req: AdmissionRequest | undefined;
  try {
    const read = readAdmissionReview(body);
    if (!read.ok) return { status: 400, body: badAdmissionReview(read.message) };
    req = read.review.request;
    const d = decide(req, inputs, policy);
    if ('bad' in d) return { status: 400, body: badAdmissionReview(d.bad) };
    return { status: 200, body: admissionReviewResponse(req.uid, d) };
  } catch (error) {
    if (!req) return { status: 400, body: badAdmissionReview(`it could not be read (${String(error)})`), error };
    return { status: 200, body: admissionReviewResponse(req.uid, failed(req, error, policy)), error };
  }
}
