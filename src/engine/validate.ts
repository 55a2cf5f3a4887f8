/**
 * Validation of one Module for one kernel: kernel-mapping resolution, then the stages in the
 * order of the product documentation. Used by the `check` command and by the controller.
 */
import type { DockerConfig, Platform } from '../registry/types.ts';
import { resolveModuleForKernel, type KmmModule } from './module.ts';
import type { ImageStage, StageOutcome } from './types.ts';

export type EngineStage = 'Mapping' | 'Image' | 'Build' | 'Sign';

export interface ModuleVerdict {
  readonly namespace: string;
  readonly name: string;
  readonly status: StageOutcome['status'];
  /** The stage that decided. */
  readonly stage: EngineStage;
  readonly reason: string;
  readonly code: string;
  /** The image checked, when a mapping matched. */
  readonly image?: string;
}

export interface ValidationDeps {
  readonly imageStage: ImageStage;
  /** Target platform (the cluster nodes' architecture), never this process's CPU by default. */
  readonly platform: Platform;
  /** Credentials for a Module: its `imageRepoSecret`, or those given to the command. */
  readonly credentialsFor: (module: KmmModule) => Promise<DockerConfig | undefined>;
  /** Extra CA certificates trusted for every registry. */
  readonly caCertificates?: readonly string[];
}

export async function validateModuleForKernel(module: KmmModule, kernel: string, deps: ValidationDeps, signal?: AbortSignal): Promise<ModuleVerdict> {
  const id = { namespace: module.metadata.namespace ?? '', name: module.metadata.name };
  const resolution = resolveModuleForKernel(module, kernel);
  switch (resolution.kind) {
    case 'nothing-to-validate':
      return { ...id, status: 'True', stage: 'Mapping', code: 'NothingToValidate', reason: resolution.reason };
    case 'no-mapping':
      return { ...id, status: 'False', stage: 'Mapping', code: 'NoKernelMapping', reason: resolution.reason };
    case 'invalid':
      return { ...id, status: 'False', stage: 'Mapping', code: 'InvalidModule', reason: resolution.reason };
  }
  const m = resolution.mapping;
  let credentials: DockerConfig | undefined;
  try {
    credentials = await deps.credentialsFor(module);
  } catch (err) {
    return { ...id, status: 'False', stage: 'Image', code: 'PullSecretUnreadable', reason: (err as Error).message, image: m.containerImage };
  }
  const outcome = await deps.imageStage.run({
    image: m.containerImage,
    moduleName: m.moduleName,
    dirName: m.dirName,
    kernel,
    platform: deps.platform,
    access: {
      ...(credentials ? { credentials } : {}),
      insecure: m.registryTLS.insecure,
      insecureSkipTLSVerify: m.registryTLS.insecureSkipTLSVerify,
      ...(deps.caCertificates ? { caCertificates: deps.caCertificates } : {}),
    },
    ...(signal ? { signal } : {}),
  });
  if (outcome.status === 'False' && (m.build || m.sign)) {
    // The Build and Sign stages would run here; until they exist the verdict says so plainly.
    const next = m.build ? 'build' : 'sign';
    return {
      ...id,
      status: 'False',
      stage: 'Image',
      code: outcome.code,
      reason: `${outcome.reason}; the Module has a ${next} section, but the ${m.build ? 'Build' : 'Sign'} stage is not available in this version, so the ${next} was not run`,
      image: m.containerImage,
    };
  }
  return { ...id, status: outcome.status, stage: 'Image', code: outcome.code, reason: outcome.reason, image: m.containerImage };
}
