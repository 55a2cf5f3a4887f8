/**
 * Types shared by the validation engine's parts: what a stage is given and what it concludes.
 */
import type { Platform, RegistryAccess } from '../registry/types.ts';

/**
 * The verdict of a stage. `True`: the module will load; `False`: it will not, for a reason the
 * Module's owner can fix; `Error`: the check itself could not be made (registry unreachable,
 * timeout) and is worth retrying.
 */
export interface StageOutcome {
  readonly status: 'True' | 'False' | 'Error';
  /** One sentence a person can act on, e.g. `image quay.io/x/y:6.1 not found`. */
  readonly reason: string;
  /** A stable, CamelCase code for the reason (metrics, tests), e.g. `ImageNotFound`. */
  readonly code: string;
}

export interface ImageStageInput {
  /** Image reference with template variables already substituted. */
  readonly image: string;
  /** `modprobe.moduleName`: the module to find (`-` and `_` are equal). */
  readonly moduleName: string;
  /** `modprobe.dirName`, default `/opt`: modules are under `<dirName>/lib/modules/<kernel>/`. */
  readonly dirName: string;
  /** The target kernel (full version string as in `uname -r`). */
  readonly kernel: string;
  readonly access: RegistryAccess;
  readonly platform: Platform;
  readonly signal?: AbortSignal;
}

export interface ImageStage {
  run(input: ImageStageInput): Promise<StageOutcome>;
}
