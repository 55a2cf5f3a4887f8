/**
 * What the preflight controller reads, behind one narrow interface: the cluster's KMM Modules and
 * the Secrets and ConfigMaps they reference. Two implementations: informers on a kube-apiserver
 * (cluster-inputs.ts) and a directory of manifests for the stand-alone mode (directory-inputs.ts).
 *
 * Event contract, the same for both:
 * - Nothing is emitted before the first full read. Then one `added` event per Module present is
 *   emitted, and `synced` resolves; register listeners right after creating the inputs.
 * - After that, `module` events follow every change of a Module, and `dependency` events follow a
 *   change of the content of a Secret or ConfigMap (created, data changed, deleted) that at least
 *   one Module references, naming exactly the Modules that reference it (from a reverse index).
 * - The state (`modules()`, `pullSecret()`, ...) is updated before a listener is called, so a
 *   listener reads the state the event describes. A listener that throws is logged, not fatal.
 * - A Module that does not parse is reported through `onInvalid` and left out. From a cluster, a
 *   previously good version of it is then `deleted` (the object is what it is); from a directory,
 *   the file that holds it keeps its previous state (an edit in progress must not drop Modules).
 */
import type { Logger } from 'pino';
import { moduleKey, type Build, type KmmModule, type Sign } from '../engine/module.ts';

export type ModuleChangeType = 'added' | 'modified' | 'deleted';

export interface ModuleChange {
  readonly type: ModuleChangeType;
  /** For `deleted`, the last version known. */
  readonly module: KmmModule;
}

export type DependencyKind = 'Secret' | 'ConfigMap';

export interface DependencyChange {
  readonly kind: DependencyKind;
  readonly namespace: string;
  readonly name: string;
  /** Keys (`namespace/name`) of the Modules that reference the object, sorted. */
  readonly modules: readonly string[];
}

export interface ClusterInputs {
  /** Current Modules (parsed; invalid ones reported through `onInvalid`, not thrown), sorted by key. */
  modules(): readonly KmmModule[];
  /**
   * `.dockerconfigjson` text of a Secret, or undefined; `namespace/name`. The key is read whatever
   * the Secret's `type` (KMM reads the key too). The cluster implementation holds the data of the
   * Secrets that Modules reference only: another Secret gives undefined.
   */
  pullSecret(namespace: string, name: string): string | undefined;
  /** Data of a Secret (for signing keys later) and of a ConfigMap (Dockerfiles later). */
  secretData(namespace: string, name: string): Readonly<Record<string, Buffer>> | undefined;
  configMapData(namespace: string, name: string): Readonly<Record<string, string>> | undefined;
  /** Resolves once the first full list of everything has been read. */
  readonly synced: Promise<void>;
  /** A Module was added, changed (spec or generation or resourceVersion), or deleted; or a Secret/ConfigMap that Modules reference changed — with the keys (`namespace/name`) of the Modules that reference it. */
  on(event: 'module', listener: (change: ModuleChange) => void): void;
  on(event: 'dependency', listener: (change: DependencyChange) => void): void;
  stop(): Promise<void>;
}

/** Called for a Module that cannot be used: its key (`namespace/name`, when known) and every problem. */
export type InvalidModuleHandler = (key: string, errors: readonly string[]) => void;

export interface InputsOptions {
  readonly onInvalid?: InvalidModuleHandler;
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

export interface ModuleReferences {
  /** Secret names in the Module's namespace, sorted, without duplicates or empty names. */
  readonly secrets: readonly string[];
  readonly configMaps: readonly string[];
}

/**
 * What a Module references: `spec.imageRepoSecret`, and in the container's and in every kernel
 * mapping's `build` and `sign`: `build.secrets[]`, `build.dockerfileConfigMap`, `sign.keySecret`,
 * `sign.certSecret`.
 */
export function moduleReferences(module: KmmModule): ModuleReferences {
  const secrets = new Set<string>();
  const configMaps = new Set<string>();
  const add = (set: Set<string>, name: string | undefined) => {
    if (name) set.add(name);
  };
  const fromBuild = (b: Build | undefined) => {
    if (!b) return;
    for (const s of b.secrets ?? []) add(secrets, s.name);
    add(configMaps, b.dockerfileConfigMap?.name);
  };
  const fromSign = (s: Sign | undefined) => {
    if (!s) return;
    add(secrets, s.keySecret?.name);
    add(secrets, s.certSecret?.name);
  };
  add(secrets, module.spec.imageRepoSecret?.name);
  const container = module.spec.moduleLoader?.container;
  if (container) {
    fromBuild(container.build);
    fromSign(container.sign);
    for (const m of container.kernelMappings) {
      fromBuild(m.build);
      fromSign(m.sign);
    }
  }
  return { secrets: [...secrets].sort(), configMaps: [...configMaps].sort() };
}

/** `namespace/name` */
export function objectKey(namespace: string, name: string): string {
  return `${namespace}/${name}`;
}

/**
 * The reverse index Secret/ConfigMap → Modules. Keys are `namespace/name`; a Module references
 * objects of its own namespace only.
 */
export class ReferenceIndex {
  readonly #byModule = new Map<string, { secrets: readonly string[]; configMaps: readonly string[] }>();
  readonly #users: Record<DependencyKind, Map<string, Set<string>>> = { Secret: new Map(), ConfigMap: new Map() };

  /**
   * Records what `module` references now (replacing what it referenced before) and returns the
   * objects that no Module referenced before and the ones no Module references any more.
   */
  set(module: KmmModule): { readonly added: readonly DependencyRef[]; readonly removed: readonly DependencyRef[] } {
    const key = moduleKey(module);
    const ns = module.metadata.namespace ?? '';
    const refs = moduleReferences(module);
    const next = { secrets: refs.secrets.map((n) => objectKey(ns, n)), configMaps: refs.configMaps.map((n) => objectKey(ns, n)) };
    const removed = this.#unlink(key);
    const added: DependencyRef[] = [];
    this.#byModule.set(key, next);
    for (const [kind, keys] of [['Secret', next.secrets], ['ConfigMap', next.configMaps]] as const) {
      for (const k of keys) {
        let users = this.#users[kind].get(k);
        if (!users) this.#users[kind].set(k, (users = new Set()));
        if (users.size === 0) added.push({ kind, key: k });
        users.add(key);
      }
    }
    // An object dropped and taken again in the same change is neither added nor removed.
    const stillUsed = removed.filter((r) => !this.isReferenced(r.kind, r.key));
    const wasUsed = new Set(removed.map((r) => `${r.kind}:${r.key}`));
    return { added: added.filter((a) => !wasUsed.has(`${a.kind}:${a.key}`)), removed: stillUsed };
  }

  /** Forgets a Module; returns the objects no Module references any more. */
  delete(moduleKeyValue: string): readonly DependencyRef[] {
    const removed = this.#unlink(moduleKeyValue);
    this.#byModule.delete(moduleKeyValue);
    return removed.filter((r) => !this.isReferenced(r.kind, r.key));
  }

  #unlink(key: string): DependencyRef[] {
    const previous = this.#byModule.get(key);
    if (!previous) return [];
    const out: DependencyRef[] = [];
    for (const [kind, keys] of [['Secret', previous.secrets], ['ConfigMap', previous.configMaps]] as const) {
      for (const k of keys) {
        const users = this.#users[kind].get(k);
        if (!users) continue;
        users.delete(key);
        if (users.size === 0) {
          this.#users[kind].delete(k);
          out.push({ kind, key: k });
        }
      }
    }
    return out;
  }

  /** Keys of the Modules referencing the object, sorted. */
  modulesFor(kind: DependencyKind, key: string): string[] {
    return [...(this.#users[kind].get(key) ?? [])].sort();
  }

  isReferenced(kind: DependencyKind, key: string): boolean {
    return (this.#users[kind].get(key)?.size ?? 0) > 0;
  }
}

export interface DependencyRef {
  readonly kind: DependencyKind;
  /** `namespace/name` */
  readonly key: string;
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/** The listeners of a ClusterInputs; a listener that throws is logged and the others still run. */
export class InputEvents {
  readonly #module: ((c: ModuleChange) => void)[] = [];
  readonly #dependency: ((c: DependencyChange) => void)[] = [];
  readonly #logger: Logger;

  constructor(logger: Logger) {
    this.#logger = logger;
  }

  on(event: 'module', listener: (change: ModuleChange) => void): void;
  on(event: 'dependency', listener: (change: DependencyChange) => void): void;
  on(event: 'module' | 'dependency', listener: ((c: ModuleChange) => void) | ((c: DependencyChange) => void)): void {
    if (event === 'module') this.#module.push(listener as (c: ModuleChange) => void);
    else if (event === 'dependency') this.#dependency.push(listener as (c: DependencyChange) => void);
    else throw new Error(`unknown event ${String(event)}`);
  }

  module(change: ModuleChange): void {
    for (const l of [...this.#module]) {
      try {
        l(change);
      } catch (err) {
        this.#logger.error({ err, module: moduleKey(change.module), change: change.type }, 'a Module listener failed');
      }
    }
  }

  dependency(change: DependencyChange): void {
    for (const l of [...this.#dependency]) {
      try {
        l(change);
      } catch (err) {
        this.#logger.error({ err, kind: change.kind, object: objectKey(change.namespace, change.name) }, 'a dependency listener failed');
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** JSON with object keys sorted: equal for structurally equal values whatever their key order. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) => {
    if (v === null || typeof v !== 'object' || Array.isArray(v) || Buffer.isBuffer(v)) return v;
    const o = v as Record<string, unknown>;
    const sorted: Record<string, unknown> = {};
    for (const k of Object.keys(o).sort()) sorted[k] = o[k];
    return sorted;
  });
}

/** Byte-wise equality of two Secret data maps. */
export function sameSecretData(a: Readonly<Record<string, Buffer>> | undefined, b: Readonly<Record<string, Buffer>> | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  if (ka.length !== kb.length || ka.some((k, i) => k !== kb[i])) return false;
  return ka.every((k) => a[k]!.equals(b[k]!));
}

export function sameStringData(a: Readonly<Record<string, string>> | undefined, b: Readonly<Record<string, string>> | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  return ka.length === kb.length && ka.every((k, i) => k === kb[i] && a[k] === b[k]);
}

/** The `.dockerconfigjson` key of Secret data as text. */
export function dockerConfigJsonOf(data: Readonly<Record<string, Buffer>> | undefined): string | undefined {
  const v = data?.['.dockerconfigjson'];
  return v === undefined || v.length === 0 ? undefined : v.toString('utf8');
}
