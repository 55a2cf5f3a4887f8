/**
 * Validation of one Module for one kernel: kernel-mapping resolution, then the stages in the
 * order of the product documentation (DESIGN §4). Used by the `check` command and by the
 * controller.
 *
 * 1. Image: the image exists and holds the module for the kernel. Success ends the validation.
 * 2. Build, only when Image failed and the mapping has `build`: the build runs (a Job, or buildah
 *    here); with `pushBuiltImage` its image goes to `containerImage`, or to a temporary name when
 *    a Sign stage follows. A build takes a while: until it ends the verdict is `Unknown` in stage
 *    Build, and the caller asks again.
 * 3. Sign, only when Image failed, the mapping has `sign` and Build (if any) succeeded: the files
 *    of the Build output (else of `sign.unsignedImage`) are signed here, in a new top layer, pushed
 *    to `containerImage` with `pushBuiltImage`.
 * An image that was pushed is then put through the Image stage again: a Module is verified only
 * by an image that holds its module for the kernel.
 */
import { createHash } from 'node:crypto';
import type { Builder, BuildOutcome, BuildOwner } from '../build/types.ts';
import { parseImageReference } from '../image/reference.ts';
import type { DockerConfig, Platform, RegistryAccess } from '../registry/types.ts';
import { resolveModuleForKernel, type KmmModule, type ResolvedMapping, type ResolvedTLS } from './module.ts';
import type { SignHashAlgorithm } from '../sign/module-signature.ts';
import type { SignStage } from './sign-stage.ts';
import type { ImageStage, StageOutcome } from './types.ts';

export type EngineStage = 'Mapping' | 'Image' | 'Build' | 'Sign';

export interface ModuleVerdict {
  readonly namespace: string;
  readonly name: string;
  /** `Unknown`: a stage is still under way (a build running); ask again later. */
  readonly status: StageOutcome['status'] | 'Unknown';
  /** The stage that decided (or is under way). */
  readonly stage: EngineStage;
  readonly reason: string;
  readonly code: string;
  /** The image checked, when a mapping matched. */
  readonly image?: string;
  /**
   * To call once the verdict is recorded: removes what a finished build left (its Job, a local
   * image). Absent when there is nothing to remove.
   */
  readonly release?: () => Promise<void>;
}

/** What the Build and Sign stages need beyond the Image stage's dependencies. */
export interface BuildSignDeps {
  /** Identity of this (validation object, Module) pair: one build per key. */
  readonly key: string;
  readonly owner: BuildOwner;
  /** The validation object's `pushBuiltImage`. */
  readonly push: boolean;
  /** Absent: builds are reported as unavailable, never as passed. */
  readonly builder?: Builder;
  /** Why there is no builder, for the reason (e.g. "buildah is not installed"). */
  readonly noBuilderReason?: string;
  readonly signStage: SignStage;
  /** Hash algorithm of module signatures (default sha256). */
  readonly signHashAlgorithm?: SignHashAlgorithm;
  readonly configMapData: (namespace: string, name: string) => Readonly<Record<string, string>> | undefined;
  readonly secretData: (namespace: string, name: string) => Readonly<Record<string, Buffer>> | undefined;
  /** The `.dockerconfigjson` text of the Module's `imageRepoSecret`, for builders that run here. */
  readonly pullSecretText: (module: KmmModule) => string | undefined;
}

export interface ValidationDeps {
  readonly imageStage: ImageStage;
  /** Target platform (the cluster nodes' architecture), never this process's CPU by default. */
  readonly platform: Platform;
  /** Credentials for a Module: its `imageRepoSecret`, or those given to the command. */
  readonly credentialsFor: (module: KmmModule) => Promise<DockerConfig | undefined>;
  /** Extra CA certificates trusted for every registry. */
  readonly caCertificates?: readonly string[];
  /** The Build and Sign stages; without them a Module needing one is False, saying so. */
  readonly buildSign?: BuildSignDeps;
}

type Id = { readonly namespace: string; readonly name: string };

export async function validateModuleForKernel(module: KmmModule, kernel: string, deps: ValidationDeps, signal?: AbortSignal): Promise<ModuleVerdict> {
  const id: Id = { namespace: module.metadata.namespace ?? '', name: module.metadata.name };
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
  const accessFor = (tls: ResolvedTLS): RegistryAccess => ({
    ...(credentials ? { credentials } : {}),
    insecure: tls.insecure,
    insecureSkipTLSVerify: tls.insecureSkipTLSVerify,
    ...(deps.caCertificates ? { caCertificates: deps.caCertificates } : {}),
  });
  const imageStage = (image: string) =>
    deps.imageStage.run({
      image,
      moduleName: m.moduleName,
      dirName: m.dirName,
      kernel,
      platform: deps.platform,
      access: accessFor(m.registryTLS),
      ...(signal ? { signal } : {}),
    });
  const outcome = await imageStage(m.containerImage);
  const bs = deps.buildSign;
  if (outcome.status !== 'False' || (!m.build && !m.sign)) {
    // A build may have pushed the image before its end was seen: it is not needed any more.
    const builder = bs?.builder;
    const release = outcome.status === 'True' && m.build && builder ? { release: () => builder.release(bs.key) } : {};
    return { ...id, status: outcome.status, stage: 'Image', code: outcome.code, reason: outcome.reason, image: m.containerImage, ...release };
  }
  if (!bs) {
    const next = m.build ? 'Build' : 'Sign';
    return {
      ...id,
      status: 'False',
      stage: 'Image',
      code: outcome.code,
      reason: `${outcome.reason}; the Module has a ${next.toLowerCase()} section, but the ${next} stage is not available here, so it was not run`,
      image: m.containerImage,
    };
  }
  return buildAndSign(module, m, kernel, id, outcome, bs, { accessFor, imageStage, platform: deps.platform, ...(signal ? { signal } : {}) });
}

interface StageTools {
  readonly accessFor: (tls: ResolvedTLS) => RegistryAccess;
  readonly imageStage: (image: string) => Promise<StageOutcome>;
  readonly platform: Platform;
  readonly signal?: AbortSignal;
}

/**
 * The temporary image a build pushes when a Sign stage follows: the repository of
 * `containerImage`, a tag naming the Module (as KMM's `<namespace>_<name>_kmm_unsigned`) and a
 * hash of the final image, so that validations for several kernels never share one.
 */
export function unsignedImageName(containerImage: string, namespace: string, name: string): string {
  const ref = parseImageReference(containerImage);
  const hash = createHash('sha256').update(containerImage).digest('hex').slice(0, 8);
  const tag = `${namespace}_${name}_kmm_preflight_unsigned_${hash}`.replace(/[^\w.-]/g, '_').slice(0, 128);
  return `${ref.domain}/${ref.path}:${tag}`;
}

function fingerprintOf(parts: unknown): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex');
}

function hashSecretData(data: Readonly<Record<string, Buffer>> | undefined): string {
  if (!data) return '';
  const h = createHash('sha256');
  for (const k of Object.keys(data).sort()) h.update(k).update('\0').update(data[k]!).update('\0');
  return h.digest('hex');
}

async function buildAndSign(
  module: KmmModule,
  m: ResolvedMapping,
  kernel: string,
  id: Id,
  image: StageOutcome,
  bs: BuildSignDeps,
  t: StageTools,
): Promise<ModuleVerdict> {
  const ns = id.namespace;
  const verdict = (status: ModuleVerdict['status'], stage: EngineStage, code: string, reason: string, extra: Partial<ModuleVerdict> = {}): ModuleVerdict => ({
    ...id,
    status,
    stage,
    code,
    reason,
    image: m.containerImage,
    ...extra,
  });

  // ---- Build
  let built: Extract<BuildOutcome, { state: 'Succeeded' }> | undefined;
  let release: (() => Promise<void>) | undefined;
  if (m.build) {
    const b = m.build;
    if (!bs.builder) {
      return verdict('False', 'Build', 'BuilderUnavailable', `${image.reason}; the build was not run: ${bs.noBuilderReason ?? 'no builder is available here'}`);
    }
    if (!b.dockerfileConfigMap) return verdict('False', 'Build', 'DockerfileMissing', `the Module's build section names no dockerfileConfigMap`);
    const dockerfile = bs.configMapData(ns, b.dockerfileConfigMap)?.['dockerfile'];
    if (dockerfile === undefined) {
      return verdict('False', 'Build', 'DockerfileMissing', `${image.reason}; the build cannot run: ConfigMap ${ns}/${b.dockerfileConfigMap} does not exist or has no "dockerfile" key`);
    }
    for (const s of b.secrets) {
      if (!bs.secretData(ns, s)) return verdict('False', 'Build', 'BuildSecretMissing', `${image.reason}; the build cannot run: its Secret ${ns}/${s} (build.secrets) does not exist`);
    }
    const destination = m.sign ? unsignedImageName(m.containerImage, ns, id.name) : m.containerImage;
    const pullSecret = bs.pullSecretText(module);
    const request = {
      key: bs.key,
      owner: bs.owner,
      namespace: ns,
      moduleName: id.name,
      kernel,
      dockerfile,
      dockerfileConfigMap: b.dockerfileConfigMap,
      buildArgs: b.buildArgs,
      secrets: b.secrets,
      secretData: (name: string) => bs.secretData(ns, name),
      destination,
      push: bs.push,
      registryTLS: m.registryTLS,
      baseImageRegistryTLS: b.baseImageRegistryTLS,
      ...(m.imageRepoSecret ? { imageRepoSecret: m.imageRepoSecret } : {}),
      ...(pullSecret !== undefined ? { dockerConfigJson: pullSecret } : {}),
      ...(b.selector ? { selector: b.selector } : {}),
      ...(b.kanikoTag ? { kanikoTag: b.kanikoTag } : {}),
      fingerprint: fingerprintOf([b, dockerfile, destination, bs.push, m.registryTLS, m.imageRepoSecret, b.secrets.map((s) => hashSecretData(bs.secretData(ns, s))), pullSecret === undefined ? '' : createHash('sha256').update(pullSecret).digest('hex')]),
    };
    const out = await bs.builder.run(request, t.signal);
    const builder = bs.builder;
    release = () => builder.release(bs.key);
    switch (out.state) {
      case 'Running':
        return verdict('Unknown', 'Build', 'Building', out.reason);
      case 'Failed':
      case 'Unavailable':
        return verdict('False', 'Build', out.code, out.reason, { release });
      case 'Error':
        return verdict('Error', 'Build', out.code, out.reason);
      case 'Succeeded':
        built = out;
    }
    if (!m.sign) {
      if (!built.pushed) return verdict('True', 'Build', 'Built', built.reason, { release });
      return afterPush(await t.imageStage(m.containerImage), 'Build', built.reason, verdict, release);
    }
  }

  // ---- Sign
  const s = m.sign!;
  let input: string;
  let inputTLS: ResolvedTLS;
  if (built) {
    if (!built.pushed) {
      return verdict(
        'False',
        'Sign',
        'SignInputNotPushed',
        `${built.reason}; the Sign stage signs the built image, which stays in the builder because pushBuiltImage is false: set pushBuiltImage: true to build, sign and push`,
        { release: release! },
      );
    }
    input = built.image;
    inputTLS = m.registryTLS;
  } else if (s.unsignedImage) {
    input = s.unsignedImage;
    inputTLS = s.unsignedImageRegistryTLS;
  } else {
    return verdict('False', 'Sign', 'UnsignedImageMissing', `${image.reason}; the Module's sign section has no unsignedImage and no build section produces one`);
  }
  const withRelease = release ? { release } : {};
  const secretKey = (secret: string | undefined, field: 'keySecret' | 'certSecret', dataKey: 'key' | 'cert'): Buffer | ModuleVerdict => {
    if (!secret) return verdict('False', 'Sign', 'SigningSecretMissing', `the Module's sign section names no ${field}`, withRelease);
    const data = bs.secretData(ns, secret);
    if (!data) return verdict('False', 'Sign', 'SigningSecretMissing', `${image.reason}; the signing ${field === 'keySecret' ? 'key' : 'certificate'} Secret ${ns}/${secret} (sign.${field}) does not exist`, withRelease);
    const value = data[dataKey];
    if (!value || value.length === 0) return verdict('False', 'Sign', 'SigningSecretMissing', `Secret ${ns}/${secret} (sign.${field}) has no "${dataKey}" key`, withRelease);
    return value;
  };
  const key = secretKey(s.keySecret, 'keySecret', 'key');
  if (!Buffer.isBuffer(key)) return key;
  const certificate = secretKey(s.certSecret, 'certSecret', 'cert');
  if (!Buffer.isBuffer(certificate)) return certificate;

  const signed = await bs.signStage.run({
    inputImage: input,
    inputAccess: t.accessFor(inputTLS),
    outputImage: m.containerImage,
    outputAccess: t.accessFor(m.registryTLS),
    push: bs.push,
    filesToSign: s.filesToSign,
    dirName: m.dirName,
    moduleName: m.moduleName,
    kernel,
    key,
    certificate,
    ...(bs.signHashAlgorithm ? { hashAlgorithm: bs.signHashAlgorithm } : {}),
    keySecret: `${ns}/${s.keySecret}`,
    certSecret: `${ns}/${s.certSecret}`,
    platform: t.platform,
    ...(t.signal ? { signal: t.signal } : {}),
  });
  if (signed.status !== 'True') return verdict(signed.status, 'Sign', signed.code, signed.reason, signed.status === 'Error' ? {} : withRelease);
  if (!bs.push) return verdict('True', 'Sign', signed.code, signed.reason, withRelease);
  return afterPush(await t.imageStage(m.containerImage), 'Sign', signed.reason, verdict, release);
}

/** The verdict on an image a stage pushed: the Image stage's, told after what the stage did. */
function afterPush(
  check: StageOutcome,
  stage: EngineStage,
  did: string,
  verdict: (status: ModuleVerdict['status'], stage: EngineStage, code: string, reason: string, extra?: Partial<ModuleVerdict>) => ModuleVerdict,
  release: (() => Promise<void>) | undefined,
): ModuleVerdict {
  const extra = release && check.status !== 'Error' ? { release } : {};
  if (check.status === 'True') return verdict('True', stage, check.code, `${did}; ${check.reason}`, extra);
  return verdict(check.status, stage, check.code, `${did}, but the pushed image does not pass the Image stage: ${check.reason}`, extra);
}
