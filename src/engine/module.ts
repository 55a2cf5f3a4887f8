/**
 * The part of KMM's `kmm.sigs.x-k8s.io/v1beta1` `Module` this product reads, a structural parser
 * for it, and the resolution of a Module for one kernel as KMM's operator does it
 * (internal/module/kernelmapper.go `GetModuleLoaderDataForKernel`, internal/buildsign/helper.go
 * `GetRelevantBuild`/`GetRelevantSign`, api/v1beta1/module_webhook.go).
 */
import {
  compileKernelRegexp,
  kernelTemplateVars,
  kernelVersionParts,
  normalizeKernelVersion,
  type CompiledRegexp,
} from './kernel-mapping.ts';
import { substituteTemplate, type TemplateVars } from './templates.ts';

export { kernelVersionParts, normalizeKernelVersion } from './kernel-mapping.ts';
export type { KernelVersionParts } from './kernel-mapping.ts';

export const MODULE_API_VERSION = 'kmm.sigs.x-k8s.io/v1beta1';
export const MODULE_KIND = 'Module';
/** The CRD default of `modprobe.dirName`. */
export const DEFAULT_DIR_NAME = '/opt';

// ---------------------------------------------------------------------------------------------
// Types (JSON field names as in api/v1beta1/module_types.go; a Go nil is an absent field here)
// ---------------------------------------------------------------------------------------------

export interface LocalObjectReference {
  readonly name: string;
}

export interface TLSOptions {
  readonly insecure?: boolean;
  readonly insecureSkipTLSVerify?: boolean;
}

export interface BuildArg {
  readonly name: string;
  readonly value: string;
}

export interface KanikoParams {
  readonly tag?: string;
}

export interface Build {
  readonly buildArgs?: readonly BuildArg[];
  /** Required by the CRD in every `build` object. */
  readonly dockerfileConfigMap?: LocalObjectReference;
  readonly baseImageRegistryTLS?: TLSOptions;
  readonly secrets?: readonly LocalObjectReference[];
  readonly kanikoParams?: KanikoParams;
  readonly selector?: Readonly<Record<string, string>>;
}

export interface Sign {
  readonly unsignedImage?: string;
  readonly unsignedImageRegistryTLS?: TLSOptions;
  /** Required by the CRD in every `sign` object. */
  readonly keySecret?: LocalObjectReference;
  /** Required by the CRD in every `sign` object. */
  readonly certSecret?: LocalObjectReference;
  readonly filesToSign?: readonly string[];
}

export interface KernelMapping {
  readonly literal?: string;
  readonly regexp?: string;
  readonly containerImage?: string;
  readonly build?: Build;
  readonly sign?: Sign;
  readonly registryTLS?: TLSOptions;
  readonly inTreeModulesToRemove?: readonly string[];
  /** Deprecated in KMM in favour of `inTreeModulesToRemove`. */
  readonly inTreeModuleToRemove?: string;
}

export interface ModprobeArgs {
  readonly load?: readonly string[];
  readonly unload?: readonly string[];
}

export interface ModprobeSpec {
  /** May be unset only when `rawArgs` is set (KMM's webhook). */
  readonly moduleName?: string;
  readonly parameters?: readonly string[];
  /** CRD default `/opt`. */
  readonly dirName?: string;
  readonly args?: ModprobeArgs;
  readonly rawArgs?: ModprobeArgs;
  readonly firmwarePath?: string;
  readonly modulesLoadingOrder?: readonly string[];
}

export type ImagePullPolicy = 'Always' | 'Never' | 'IfNotPresent';

export interface ModuleLoaderContainerSpec {
  readonly modprobe: ModprobeSpec;
  readonly containerImage?: string;
  readonly imagePullPolicy?: ImagePullPolicy;
  readonly kernelMappings: readonly KernelMapping[];
  readonly build?: Build;
  readonly sign?: Sign;
  readonly registryTLS?: TLSOptions;
  readonly inTreeModulesToRemove?: readonly string[];
  /** Deprecated in KMM in favour of `inTreeModulesToRemove`. */
  readonly inTreeModuleToRemove?: string;
  readonly version?: string;
}

export interface ModuleLoaderSpec {
  readonly container: ModuleLoaderContainerSpec;
  readonly serviceAccountName?: string;
}

export interface ModuleSpec {
  /** Absent for a device-plugin-only Module. */
  readonly moduleLoader?: ModuleLoaderSpec;
  readonly imageRepoSecret?: LocalObjectReference;
  readonly selector: Readonly<Record<string, string>>;
}

export interface ModuleMetadata {
  readonly name: string;
  readonly namespace?: string;
  readonly generation?: number;
  readonly resourceVersion?: string;
  readonly uid?: string;
  /** RFC 3339, as kube-apiserver sets it. */
  readonly creationTimestamp?: string;
}

export interface KmmModule {
  readonly apiVersion?: string;
  readonly kind?: string;
  readonly metadata: ModuleMetadata;
  readonly spec: ModuleSpec;
}

/** `namespace/name`; a Module read from a file without a namespace gives `/name`. */
export function moduleKey(module: KmmModule): string {
  return `${module.metadata.namespace ?? ''}/${module.metadata.name}`;
}

// ---------------------------------------------------------------------------------------------
// Structural parser
// ---------------------------------------------------------------------------------------------

export type ParseModuleResult = { readonly ok: true; readonly module: KmmModule } | { readonly ok: false; readonly errors: string[] };

export interface ParseModuleOptions {
  /** Namespace to assume when `metadata.namespace` is absent (e.g. kubectl's current namespace). */
  readonly defaultNamespace?: string;
}

type Obj = Record<string, unknown>;

function isObject(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `a ${typeof v}`;
}

/**
 * Reads fields off an object, collecting errors with their paths. `null` counts as absent, since
 * Go's JSON encoder writes nil pointers and slices without `omitempty` as `null`.
 */
class Reader {
  readonly errors: string[];

  constructor(errors: string[]) {
    this.errors = errors;
  }

  fail(path: string, message: string): undefined {
    this.errors.push(`${path}: ${message}`);
    return undefined;
  }

  object(v: unknown, path: string, required = false): Obj | undefined {
    if (v === undefined || v === null) return required ? this.fail(path, 'required') : undefined;
    return isObject(v) ? v : this.fail(path, `must be an object, got ${describe(v)}`);
  }

  string(v: unknown, path: string, required = false): string | undefined {
    if (v === undefined || v === null) return required ? this.fail(path, 'required') : undefined;
    return typeof v === 'string' ? v : this.fail(path, `must be a string, got ${describe(v)}`);
  }

  nonEmptyString(v: unknown, path: string): string | undefined {
    const s = this.string(v, path, true);
    if (s === '') return this.fail(path, 'must not be empty');
    return s;
  }

  boolean(v: unknown, path: string): boolean | undefined {
    if (v === undefined || v === null) return undefined;
    return typeof v === 'boolean' ? v : this.fail(path, `must be a boolean, got ${describe(v)}`);
  }

  integer(v: unknown, path: string): number | undefined {
    if (v === undefined || v === null) return undefined;
    return typeof v === 'number' && Number.isSafeInteger(v) ? v : this.fail(path, `must be an integer, got ${describe(v)}`);
  }

  array<T>(v: unknown, path: string, item: (x: unknown, p: string) => T | undefined, required = false): T[] | undefined {
    if (v === undefined || v === null) return required ? this.fail(path, 'required') : undefined;
    if (!Array.isArray(v)) return this.fail(path, `must be an array, got ${describe(v)}`);
    const out: T[] = [];
    v.forEach((x, i) => {
      const parsed = item(x, `${path}[${i}]`);
      if (parsed !== undefined) out.push(parsed);
    });
    return out;
  }

  strings(v: unknown, path: string): string[] | undefined {
    return this.array(v, path, (x, p) => this.string(x, p, true));
  }

  stringMap(v: unknown, path: string, required = false): Record<string, string> | undefined {
    const o = this.object(v, path, required);
    if (o === undefined) return undefined;
    const out: Record<string, string> = {};
    for (const [k, val] of Object.entries(o)) {
      const s = this.string(val, `${path}[${JSON.stringify(k)}]`, true);
      if (s !== undefined) out[k] = s;
    }
    return out;
  }

  ref(v: unknown, path: string): LocalObjectReference | undefined {
    const o = this.object(v, path);
    if (o === undefined) return undefined;
    // The CRD defaults `name` to "" (LocalObjectReference); an empty name is caught where used.
    return { name: this.string(o.name, `${path}.name`) ?? '' };
  }

  tls(v: unknown, path: string): TLSOptions | undefined {
    const o = this.object(v, path);
    if (o === undefined) return undefined;
    return compact({
      insecure: this.boolean(o.insecure, `${path}.insecure`),
      insecureSkipTLSVerify: this.boolean(o.insecureSkipTLSVerify, `${path}.insecureSkipTLSVerify`),
    });
  }

  build(v: unknown, path: string): Build | undefined {
    const o = this.object(v, path);
    if (o === undefined) return undefined;
    if (o.dockerfileConfigMap === undefined || o.dockerfileConfigMap === null) {
      this.fail(`${path}.dockerfileConfigMap`, 'required');
    }
    const kaniko = this.object(o.kanikoParams, `${path}.kanikoParams`);
    return compact({
      buildArgs: this.array(o.buildArgs, `${path}.buildArgs`, (x, p) => {
        const a = this.object(x, p, true);
        if (a === undefined) return undefined;
        const name = this.nonEmptyString(a.name, `${p}.name`);
        const value = this.string(a.value, `${p}.value`, true);
        return name === undefined || value === undefined ? undefined : { name, value };
      }),
      dockerfileConfigMap: this.ref(o.dockerfileConfigMap, `${path}.dockerfileConfigMap`),
      baseImageRegistryTLS: this.tls(o.baseImageRegistryTLS, `${path}.baseImageRegistryTLS`),
      secrets: this.array(o.secrets, `${path}.secrets`, (x, p) => this.ref(x, p) ?? this.fail(p, 'required')),
      kanikoParams: kaniko === undefined ? undefined : compact({ tag: this.string(kaniko.tag, `${path}.kanikoParams.tag`) }),
      selector: this.stringMap(o.selector, `${path}.selector`),
    });
  }

  sign(v: unknown, path: string): Sign | undefined {
    const o = this.object(v, path);
    if (o === undefined) return undefined;
    for (const key of ['keySecret', 'certSecret'] as const) {
      if (o[key] === undefined || o[key] === null) this.fail(`${path}.${key}`, 'required');
    }
    return compact({
      unsignedImage: this.string(o.unsignedImage, `${path}.unsignedImage`),
      unsignedImageRegistryTLS: this.tls(o.unsignedImageRegistryTLS, `${path}.unsignedImageRegistryTLS`),
      keySecret: this.ref(o.keySecret, `${path}.keySecret`),
      certSecret: this.ref(o.certSecret, `${path}.certSecret`),
      filesToSign: this.strings(o.filesToSign, `${path}.filesToSign`),
    });
  }

  modprobeArgs(v: unknown, path: string): ModprobeArgs | undefined {
    const o = this.object(v, path);
    if (o === undefined) return undefined;
    return compact({ load: this.strings(o.load, `${path}.load`), unload: this.strings(o.unload, `${path}.unload`) });
  }
}

/** Drops undefined properties, so that absent stays absent under exactOptionalPropertyTypes-style reading. */
function compact<T extends object>(o: T): T {
  for (const k of Object.keys(o) as (keyof T)[]) if (o[k] === undefined) delete o[k];
  return o;
}

const PULL_POLICIES: readonly string[] = ['Always', 'Never', 'IfNotPresent'];

/**
 * Checks the shape of a Module manifest (types, required fields as in the CRD) without a JSON
 * Schema and returns a typed Module or every problem, each with its field path. Unknown fields are
 * ignored, as the API server prunes them. KMM's admission rules (literal xor regexp, regexp syntax,
 * an image for every mapping, modprobe rules) are not shape: `validateModule` checks them.
 */
export function parseModule(obj: unknown, options: ParseModuleOptions = {}): ParseModuleResult {
  const errors: string[] = [];
  const r = new Reader(errors);
  const root = r.object(obj, '(root)', true);
  if (root === undefined) return { ok: false, errors };

  const apiVersion = r.string(root.apiVersion, 'apiVersion');
  if (apiVersion !== undefined && apiVersion !== MODULE_API_VERSION) {
    r.fail('apiVersion', `must be ${MODULE_API_VERSION}, got ${JSON.stringify(apiVersion)}`);
  }
  const kind = r.string(root.kind, 'kind');
  if (kind !== undefined && kind !== MODULE_KIND) r.fail('kind', `must be ${MODULE_KIND}, got ${JSON.stringify(kind)}`);

  const meta = r.object(root.metadata, 'metadata', true);
  let metadata: ModuleMetadata | undefined;
  if (meta !== undefined) {
    const name = r.nonEmptyString(meta.name, 'metadata.name');
    const rest = {
      namespace: r.string(meta.namespace, 'metadata.namespace') ?? options.defaultNamespace,
      generation: r.integer(meta.generation, 'metadata.generation'),
      resourceVersion: r.string(meta.resourceVersion, 'metadata.resourceVersion'),
      uid: r.string(meta.uid, 'metadata.uid'),
      creationTimestamp: r.string(meta.creationTimestamp, 'metadata.creationTimestamp'),
    };
    if (name !== undefined) metadata = compact({ name, ...rest });
  }

  const specObj = r.object(root.spec, 'spec', true);
  let spec: ModuleSpec | undefined;
  if (specObj !== undefined) {
    const selector = r.stringMap(specObj.selector, 'spec.selector', true);
    const imageRepoSecret = r.ref(specObj.imageRepoSecret, 'spec.imageRepoSecret');
    let moduleLoader: ModuleLoaderSpec | undefined;
    const ml = r.object(specObj.moduleLoader, 'spec.moduleLoader');
    if (ml !== undefined) {
      const c = r.object(ml.container, 'spec.moduleLoader.container', true);
      const cp = 'spec.moduleLoader.container';
      if (c !== undefined) {
        const mp = r.object(c.modprobe, `${cp}.modprobe`, true);
        const modprobe: ModprobeSpec | undefined =
          mp === undefined
            ? undefined
            : compact({
                moduleName: r.string(mp.moduleName, `${cp}.modprobe.moduleName`),
                parameters: r.strings(mp.parameters, `${cp}.modprobe.parameters`),
                dirName: r.string(mp.dirName, `${cp}.modprobe.dirName`),
                args: r.modprobeArgs(mp.args, `${cp}.modprobe.args`),
                rawArgs: r.modprobeArgs(mp.rawArgs, `${cp}.modprobe.rawArgs`),
                firmwarePath: r.string(mp.firmwarePath, `${cp}.modprobe.firmwarePath`),
                modulesLoadingOrder: r.strings(mp.modulesLoadingOrder, `${cp}.modprobe.modulesLoadingOrder`),
              });
        const mappings = r.array(
          c.kernelMappings,
          `${cp}.kernelMappings`,
          (x, p): KernelMapping | undefined => {
            const m = r.object(x, p, true);
            if (m === undefined) return undefined;
            return compact({
              literal: r.string(m.literal, `${p}.literal`),
              regexp: r.string(m.regexp, `${p}.regexp`),
              containerImage: r.string(m.containerImage, `${p}.containerImage`),
              build: r.build(m.build, `${p}.build`),
              sign: r.sign(m.sign, `${p}.sign`),
              registryTLS: r.tls(m.registryTLS, `${p}.registryTLS`),
              inTreeModulesToRemove: r.strings(m.inTreeModulesToRemove, `${p}.inTreeModulesToRemove`),
              inTreeModuleToRemove: r.string(m.inTreeModuleToRemove, `${p}.inTreeModuleToRemove`),
            });
          },
          true,
        );
        if (Array.isArray(c.kernelMappings) && c.kernelMappings.length === 0) {
          r.fail(`${cp}.kernelMappings`, 'must have at least one item');
        }
        const pullPolicy = r.string(c.imagePullPolicy, `${cp}.imagePullPolicy`);
        if (pullPolicy !== undefined && !PULL_POLICIES.includes(pullPolicy)) {
          r.fail(`${cp}.imagePullPolicy`, `must be one of Always, Never, IfNotPresent, got ${JSON.stringify(pullPolicy)}`);
        }
        const container = {
          containerImage: r.string(c.containerImage, `${cp}.containerImage`),
          imagePullPolicy: pullPolicy as ImagePullPolicy | undefined,
          build: r.build(c.build, `${cp}.build`),
          sign: r.sign(c.sign, `${cp}.sign`),
          registryTLS: r.tls(c.registryTLS, `${cp}.registryTLS`),
          inTreeModulesToRemove: r.strings(c.inTreeModulesToRemove, `${cp}.inTreeModulesToRemove`),
          inTreeModuleToRemove: r.string(c.inTreeModuleToRemove, `${cp}.inTreeModuleToRemove`),
          version: r.string(c.version, `${cp}.version`),
        };
        if (modprobe !== undefined && mappings !== undefined) {
          moduleLoader = compact({
            container: compact({ ...container, modprobe, kernelMappings: mappings }),
            serviceAccountName: r.string(ml.serviceAccountName, 'spec.moduleLoader.serviceAccountName'),
          });
        }
      }
    }
    if (selector !== undefined) spec = compact({ moduleLoader, imageRepoSecret, selector });
  }

  if (errors.length > 0 || metadata === undefined || spec === undefined) return { ok: false, errors };
  return { ok: true, module: compact({ apiVersion, kind, metadata, spec }) };
}

// ---------------------------------------------------------------------------------------------
// KMM's admission rules and the kernel-mapping regexps (compiled once per Module object)
// ---------------------------------------------------------------------------------------------

/** KMM's limit on `len(name + namespace)` when `container.version` is set (module_webhook.go). */
const MAX_COMBINED_LENGTH = 40;

interface CompiledModule {
  /** One per mapping, in order; undefined where the mapping has no regexp. */
  readonly regexps: readonly (CompiledRegexp | undefined)[];
  /** What KMM's validating webhook would refuse; empty when the Module is admissible. */
  readonly problems: readonly string[];
}

const compiled = new WeakMap<KmmModule, CompiledModule>();

function compileModule(module: KmmModule): CompiledModule {
  const cached = compiled.get(module);
  if (cached !== undefined) return cached;
  const problems: string[] = [];
  const regexps: (CompiledRegexp | undefined)[] = [];
  const container = module.spec.moduleLoader?.container;
  if (container !== undefined) {
    const cp = 'spec.moduleLoader.container';
    const nameLength = module.metadata.name.length + (module.metadata.namespace ?? '').length;
    if ((container.version ?? '') !== '' && nameLength > MAX_COMBINED_LENGTH) {
      problems.push(
        `metadata: name and namespace have a combined length of ${nameLength} characters, which exceeds the maximum of ${MAX_COMBINED_LENGTH} when ${cp}.version is set`,
      );
    }
    container.kernelMappings.forEach((m, i) => {
      const p = `${cp}.kernelMappings[${i}]`;
      const literal = m.literal ?? '';
      const regexp = m.regexp ?? '';
      if (literal !== '' && regexp !== '') problems.push(`${p}: regexp and literal are mutually exclusive`);
      if (literal === '' && regexp === '') problems.push(`${p}: regexp or literal must be set`);
      if (regexp !== '') {
        const re = compileKernelRegexp(regexp);
        regexps.push(re);
        if (!re.ok) {
          problems.push(`${p}.regexp ${JSON.stringify(regexp)} is not a valid Go (RE2) regular expression: ${re.error}`);
        }
      } else {
        regexps.push(undefined);
      }
      if ((container.containerImage ?? '') === '' && (m.containerImage ?? '') === '') {
        problems.push(`${p}.containerImage: missing, and ${cp}.containerImage is not set either`);
      }
    });
    problems.push(...modprobeProblems(container.modprobe, `${cp}.modprobe`));
  }
  const result = { regexps, problems };
  compiled.set(module, result);
  return result;
}

function modprobeProblems(modprobe: ModprobeSpec, path: string): string[] {
  const moduleName = modprobe.moduleName ?? '';
  const rawLoad = (modprobe.rawArgs?.load?.length ?? 0) > 0;
  const rawUnload = (modprobe.rawArgs?.unload?.length ?? 0) > 0;
  if (moduleName !== '') {
    if (rawLoad || rawUnload) return [`${path}: rawArgs cannot be set when moduleName is set`];
  } else if (!rawLoad || !rawUnload) {
    return [`${path}: load and unload rawArgs must be set when moduleName is unset`];
  }
  const order = modprobe.modulesLoadingOrder;
  if (order !== undefined) {
    if (order.length < 2) return [`${path}.modulesLoadingOrder: if a loading order is defined, at least two values must be defined`];
    if (moduleName === '') return [`${path}.modulesLoadingOrder: if a loading order is defined, moduleName must be set`];
    if (order[0] !== moduleName) return [`${path}.modulesLoadingOrder: if a loading order is defined, the first element must be moduleName`];
    const seen = new Set<string>();
    for (const name of order) {
      if (seen.has(name)) return [`${path}.modulesLoadingOrder: ${JSON.stringify(name)}: duplicate value in the loading order list`];
      seen.add(name);
    }
  }
  return [];
}

/**
 * What KMM's validating admission webhook (api/v1beta1/module_webhook.go) would refuse in this
 * Module, with field paths; empty when it would be admitted. Such a Module cannot be created, so it
 * loads on no kernel.
 */
export function validateModule(module: KmmModule): readonly string[] {
  return compileModule(module).problems;
}

// ---------------------------------------------------------------------------------------------
// Resolution for one kernel
// ---------------------------------------------------------------------------------------------

export interface ResolvedTLS {
  readonly insecure: boolean;
  readonly insecureSkipTLSVerify: boolean;
}

export interface ResolvedBuild {
  /**
   * The build arguments kaniko receives: the Module's, overridden by name by the mapping's (the
   * mapping's new ones appended sorted by name, as KMM's ApplyBuildArgOverrides does), then
   * `KERNEL_FULL_VERSION`, `KERNEL_VERSION` (the kernel as reported), `MOD_NAME` and
   * `MOD_NAMESPACE` set by KMM over any of the same name. KMM does not substitute variables in
   * build-arg values: the Dockerfile reads these arguments instead.
   */
  readonly buildArgs: readonly BuildArg[];
  /** The ConfigMap holding the Dockerfile (the mapping's when it sets one). */
  readonly dockerfileConfigMap?: string;
  /** The Module's secrets, then the mapping's. */
  readonly secrets: readonly string[];
  /** From the Module's build when both have one (KMM does not merge these from the mapping). */
  readonly baseImageRegistryTLS: ResolvedTLS;
  readonly kanikoTag?: string;
  readonly selector?: Readonly<Record<string, string>>;
}

export interface ResolvedSign {
  /** Templated with the kernel variables only (KMM passes no MOD_NAME/MOD_NAMESPACE here). */
  readonly unsignedImage?: string;
  /** From the Module's sign when both have one (KMM does not merge it from the mapping). */
  readonly unsignedImageRegistryTLS: ResolvedTLS;
  readonly keySecret?: string;
  readonly certSecret?: string;
  /** The Module's files, then the mapping's; templated like `unsignedImage`. */
  readonly filesToSign: readonly string[];
}

export interface ResolvedMapping {
  /** `modprobe.moduleName`. */
  readonly moduleName: string;
  /** `modprobe.dirName`, or `/opt`. */
  readonly dirName: string;
  /** The mapping's, else the container's; template variables substituted. */
  readonly containerImage: string;
  readonly registryTLS: ResolvedTLS;
  readonly build?: ResolvedBuild;
  readonly sign?: ResolvedSign;
  readonly inTreeModulesToRemove: readonly string[];
  readonly imageRepoSecret?: string;
  readonly matchedBy: { readonly literal: string } | { readonly regexp: string };
}

export type MappingResolution =
  /** No `spec.moduleLoader` (device-plugin-only Module), or no module name to look for. */
  | { readonly kind: 'nothing-to-validate'; readonly reason: string }
  /** No kernel mapping matches the kernel. */
  | { readonly kind: 'no-mapping'; readonly reason: string }
  /** KMM would refuse the Module or fail to prepare it for this kernel. */
  | { readonly kind: 'invalid'; readonly reason: string }
  | { readonly kind: 'mapping'; readonly mapping: ResolvedMapping };

function resolveTLS(tls: TLSOptions | undefined): ResolvedTLS {
  return { insecure: tls?.insecure ?? false, insecureSkipTLSVerify: tls?.insecureSkipTLSVerify ?? false };
}

/** KMM's `ApplyBuildArgOverrides` (internal/buildsign/helper.go). */
export function applyBuildArgOverrides(args: readonly BuildArg[], overrides: readonly BuildArg[]): BuildArg[] {
  const byName = new Map<string, BuildArg>();
  for (const o of overrides) byName.set(o.name, o);
  const unused = new Set(byName.keys());
  const out = args.map((a) => {
    const o = byName.get(a.name);
    if (o === undefined) return a;
    unused.delete(a.name);
    return o;
  });
  // sets.StringKeySet(...).List() is sorted (byte order, as Go compares strings).
  for (const name of [...unused].sort(compareBytes)) out.push(byName.get(name) as BuildArg);
  return out;
}

function compareBytes(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function describeMappings(mappings: readonly KernelMapping[]): string {
  const parts = mappings.map((m) =>
    (m.literal ?? '') !== '' ? `literal ${JSON.stringify(m.literal)}` : `regexp ${JSON.stringify(m.regexp ?? '')}`,
  );
  const shown = parts.slice(0, 5).join(', ');
  return parts.length > 5 ? `${shown}, and ${parts.length - 5} more` : shown;
}

/**
 * Resolves `module` for `kernel` (the node's `uname -r`) as KMM's operator does: the first mapping
 * in list order whose `literal` equals the kernel or whose `regexp` matches it (unanchored, Go
 * syntax) wins; the mapping's image, registry TLS and in-tree modules replace the container's; the
 * build and sign sections are merged; `containerImage`, `sign.unsignedImage` and
 * `sign.filesToSign` get KMM's template variables.
 */
export function resolveModuleForKernel(module: KmmModule, kernel: string): MappingResolution {
  const key = moduleKey(module);
  const loader = module.spec.moduleLoader;
  if (loader === undefined) {
    return {
      kind: 'nothing-to-validate',
      reason: `Module ${key} has no spec.moduleLoader (device plugin only): it loads no kernel module`,
    };
  }
  const container = loader.container;
  const { regexps, problems } = compileModule(module);
  if (problems.length > 0) {
    return { kind: 'invalid', reason: `Module ${key} would be refused by KMM's admission webhook: ${problems.join('; ')}` };
  }

  let index = -1;
  let matchedBy: ResolvedMapping['matchedBy'] | undefined;
  for (const [i, m] of container.kernelMappings.entries()) {
    if ((m.literal ?? '') !== '' && m.literal === kernel) {
      matchedBy = { literal: m.literal };
      index = i;
      break;
    }
    const re = regexps[i];
    if (re === undefined || !re.ok) continue;
    if (re.test(kernel)) {
      matchedBy = { regexp: re.source };
      index = i;
      break;
    }
  }
  const mapping = container.kernelMappings[index];
  if (mapping === undefined || matchedBy === undefined) {
    return {
      kind: 'no-mapping',
      reason: `no kernelMapping of Module ${key} matches kernel ${kernel} (mappings: ${describeMappings(container.kernelMappings)})`,
    };
  }

  const moduleName = container.modprobe.moduleName ?? '';
  if (moduleName === '') {
    return {
      kind: 'nothing-to-validate',
      reason: `Module ${key} loads with modprobe.rawArgs and no modprobe.moduleName: the kernel module to look for in its image is unknown`,
    };
  }

  const normalized = normalizeKernelVersion(kernel);
  const parts = kernelVersionParts(normalized);
  if (parts === undefined) {
    return {
      kind: 'invalid',
      reason: `kernel ${kernel} has fewer than three components separated by '.', ',' or '-': KMM cannot compute KERNEL_XYZ/KERNEL_Z for Module ${key} and fails to prepare it`,
    };
  }
  const kernelVars = kernelTemplateVars(parts);
  const imageVars: TemplateVars = new Map([
    ...kernelVars,
    ['MOD_NAME', module.metadata.name],
    ['MOD_NAMESPACE', module.metadata.namespace ?? ''],
  ]);
  const fail = (field: string, error: string): MappingResolution => ({
    kind: 'invalid',
    reason: `Module ${key}, kernel ${kernel}: ${field}: ${error}`,
  });
  const mp = `spec.moduleLoader.container.kernelMappings[${index}]`;

  // Container image: the mapping's, else the container's; then templated.
  const imageField = (mapping.containerImage ?? '') !== '' ? `${mp}.containerImage` : 'spec.moduleLoader.container.containerImage';
  const rawImage = (mapping.containerImage ?? '') !== '' ? (mapping.containerImage as string) : (container.containerImage ?? '');
  const image = substituteTemplate(rawImage, imageVars);
  if (!image.ok) return fail(imageField, image.error);
  if (image.value === '') return fail(imageField, `${JSON.stringify(rawImage)} is empty once its variables are substituted`);

  // Build: GetRelevantBuild, then the build args KMM sets itself (resource/common.go buildSpec).
  let build: ResolvedBuild | undefined;
  const mb = container.build;
  const kb = mapping.build;
  if (mb !== undefined || kb !== undefined) {
    const base = (mb ?? kb) as Build;
    const merged =
      mb !== undefined && kb !== undefined
        ? {
            ...mb,
            dockerfileConfigMap: kb.dockerfileConfigMap ?? mb.dockerfileConfigMap,
            buildArgs: applyBuildArgOverrides(mb.buildArgs ?? [], kb.buildArgs ?? []),
            secrets: [...(mb.secrets ?? []), ...(kb.secrets ?? [])],
          }
        : base;
    const buildArgs = applyBuildArgOverrides(merged.buildArgs ?? [], [
      { name: 'KERNEL_VERSION', value: kernel },
      { name: 'KERNEL_FULL_VERSION', value: kernel },
      { name: 'MOD_NAME', value: module.metadata.name },
      { name: 'MOD_NAMESPACE', value: module.metadata.namespace ?? '' },
    ]);
    build = compact({
      buildArgs,
      dockerfileConfigMap: merged.dockerfileConfigMap?.name,
      secrets: (merged.secrets ?? []).map((s) => s.name),
      baseImageRegistryTLS: resolveTLS(merged.baseImageRegistryTLS),
      kanikoTag: merged.kanikoParams?.tag,
      selector: merged.selector,
    });
  }

  // Sign: GetRelevantSign, templated with the kernel variables only.
  let sign: ResolvedSign | undefined;
  const ms = container.sign;
  const ks = mapping.sign;
  if (ms !== undefined || ks !== undefined) {
    const merged: Sign =
      ms !== undefined && ks !== undefined
        ? {
            ...ms,
            unsignedImage: (ks.unsignedImage ?? '') !== '' ? ks.unsignedImage : ms.unsignedImage,
            keySecret: ks.keySecret ?? ms.keySecret,
            certSecret: ks.certSecret ?? ms.certSecret,
            filesToSign: [...(ms.filesToSign ?? []), ...(ks.filesToSign ?? [])],
          }
        : ((ms ?? ks) as Sign);
    const signPath = ks !== undefined ? `${mp}.sign` : 'spec.moduleLoader.container.sign';
    const unsigned = substituteTemplate(merged.unsignedImage ?? '', kernelVars);
    if (!unsigned.ok) return fail(`${signPath}.unsignedImage`, unsigned.error);
    const files: string[] = [];
    for (const f of merged.filesToSign ?? []) {
      const r = substituteTemplate(f, kernelVars);
      if (!r.ok) return fail(`${signPath}.filesToSign`, r.error);
      files.push(r.value);
    }
    sign = compact({
      unsignedImage: unsigned.value === '' ? undefined : unsigned.value,
      unsignedImageRegistryTLS: resolveTLS(merged.unsignedImageRegistryTLS),
      keySecret: merged.keySecret?.name,
      certSecret: merged.certSecret?.name,
      filesToSign: files,
    });
  }

  // In-tree modules: the mapping's list when it has one (even empty), else the container's; the
  // deprecated single field, when set at either level (mapping first), replaces the list.
  let inTree: readonly string[] = mapping.inTreeModulesToRemove ?? container.inTreeModulesToRemove ?? [];
  const legacy = (mapping.inTreeModuleToRemove ?? '') !== '' ? mapping.inTreeModuleToRemove : container.inTreeModuleToRemove;
  if ((legacy ?? '') !== '') inTree = [legacy as string];

  const imageRepoSecret = module.spec.imageRepoSecret?.name;
  return {
    kind: 'mapping',
    mapping: compact({
      moduleName,
      dirName: (container.modprobe.dirName ?? '') !== '' ? (container.modprobe.dirName as string) : DEFAULT_DIR_NAME,
      containerImage: image.value,
      registryTLS: resolveTLS(mapping.registryTLS ?? container.registryTLS),
      build,
      sign,
      inTreeModulesToRemove: [...inTree],
      imageRepoSecret: imageRepoSecret === '' ? undefined : imageRepoSecret,
      matchedBy,
    }),
  };
}
