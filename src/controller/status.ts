/**
 * The status of a PreflightValidation as pure functions: per-Module entries whose
 * `lastTransitionTime` moves only on a real transition, the counts, and the `Verified` and
 * `Progressing` conditions kept in step with them.
 */
import type { Condition, Counts, ModuleStatus, PreflightValidationStatus, VerificationStage, VerificationStatus } from '../api/schema.ts';

export const rfc3339 = (d: Date) => d.toISOString().replace(/\.\d{3}Z$/, 'Z');

export interface EntryUpdate {
  readonly verificationStatus: VerificationStatus;
  readonly verificationStage: VerificationStage;
  readonly statusReason: string;
}

/** The entry after `update`; the same object when nothing changes (no write needed). */
export function nextEntry(prev: ModuleStatus | undefined, key: { namespace: string; name: string }, update: EntryUpdate, now: Date): ModuleStatus {
  if (
    prev &&
    prev.verificationStatus === update.verificationStatus &&
    prev.verificationStage === update.verificationStage &&
    prev.statusReason === update.statusReason
  ) {
    return prev;
  }
  const transition = !prev || prev.verificationStatus !== update.verificationStatus || prev.verificationStage !== update.verificationStage;
  return {
    namespace: key.namespace,
    name: key.name,
    verificationStatus: update.verificationStatus,
    verificationStage: update.verificationStage,
    statusReason: update.statusReason,
    lastTransitionTime: transition || !prev?.lastTransitionTime ? rfc3339(now) : prev.lastTransitionTime,
  };
}

export function countsOf(modules: readonly ModuleStatus[]): Counts {
  const c = { total: modules.length, verified: 0, failed: 0, error: 0, pending: 0 };
  for (const m of modules) {
    if (m.verificationStatus === 'True') c.verified++;
    else if (m.verificationStatus === 'False') c.failed++;
    else if (m.verificationStatus === 'Error') c.error++;
    else c.pending++;
  }
  return c;
}

function condition(prev: readonly Condition[] | undefined, next: Omit<Condition, 'lastTransitionTime'>, now: Date): Condition {
  const old = prev?.find((c) => c.type === next.type);
  const lastTransitionTime = old && old.status === next.status ? old.lastTransitionTime : rfc3339(now);
  return { ...next, lastTransitionTime };
}

const listNames = (ms: readonly ModuleStatus[], max = 3) => {
  const names = ms.slice(0, max).map((m) => `${m.namespace}/${m.name}`);
  return ms.length > max ? `${names.join(', ')} and ${ms.length - max} more` : names.join(', ');
};

export interface SummaryInput {
  readonly modules: readonly ModuleStatus[];
  readonly generation: number;
  readonly kernelVersion?: string;
  /** Set while the kernel itself is not known (OCP release not resolved): why. */
  readonly kernelProblem?: { readonly reason: string; readonly message: string; readonly retrying: boolean };
}

/** The whole status from its module entries; conditions keep their transition times. */
export function summarize(prev: PreflightValidationStatus | undefined, input: SummaryInput, now: Date): PreflightValidationStatus {
  const counts = countsOf(input.modules);
  const failed = input.modules.filter((m) => m.verificationStatus === 'False');
  const errors = input.modules.filter((m) => m.verificationStatus === 'Error');
  let verified: Omit<Condition, 'lastTransitionTime'>;
  let progressing: Omit<Condition, 'lastTransitionTime'>;
  const g = input.generation;
  if (input.kernelProblem) {
    verified = { type: 'Verified', status: 'False', observedGeneration: g, reason: input.kernelProblem.reason, message: input.kernelProblem.message };
    progressing = input.kernelProblem.retrying
      ? { type: 'Progressing', status: 'True', observedGeneration: g, reason: 'ResolvingKernel', message: input.kernelProblem.message }
      : { type: 'Progressing', status: 'False', observedGeneration: g, reason: 'KernelUnknown', message: input.kernelProblem.message };
  } else {
    verified =
      counts.verified === counts.total
        ? {
            type: 'Verified',
            status: 'True',
            observedGeneration: g,
            reason: counts.total === 0 ? 'NoModules' : 'AllModulesVerified',
            message: counts.total === 0 ? 'the cluster has no Modules to validate' : `all ${counts.total} Modules verified for kernel ${input.kernelVersion ?? ''}`.trim(),
          }
        : {
            type: 'Verified',
            status: 'False',
            observedGeneration: g,
            reason: failed.length > 0 ? 'ModulesFailed' : errors.length > 0 ? 'ModulesErrored' : 'ModulesPending',
            message: [
              `${counts.verified} of ${counts.total} Modules verified`,
              failed.length > 0 ? `failed: ${listNames(failed)}` : '',
              errors.length > 0 ? `errors (retried): ${listNames(errors)}` : '',
              counts.pending > 0 ? `${counts.pending} pending` : '',
            ]
              .filter(Boolean)
              .join('; '),
          };
    progressing =
      counts.pending > 0 || counts.error > 0
        ? {
            type: 'Progressing',
            status: 'True',
            observedGeneration: g,
            reason: 'Validating',
            message: `${counts.pending} Modules pending, ${counts.error} being retried`,
          }
        : { type: 'Progressing', status: 'False', observedGeneration: g, reason: 'Completed', message: 'every Module has a verdict' };
  }
  return {
    ...(input.kernelVersion ? { kernelVersion: input.kernelVersion } : {}),
    modules: [...input.modules],
    conditions: [condition(prev?.conditions, verified, now), condition(prev?.conditions, progressing, now)],
    counts,
    observedGeneration: g,
  };
}
