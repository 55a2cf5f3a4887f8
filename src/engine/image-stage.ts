/**
 * The Image stage: does the Module's container image hold the kernel module, built for the target
 * kernel, where modprobe will look for it (`<dirName>/lib/modules/<kernel>/`), with `depmod` run?
 *
 * Layers are scanned from the top down (docs/adr/0008-image-stage.md). Each scan depends only on
 * the layer's bytes and is cached by layer digest, so a second validation of an image (or of any
 * image sharing its layers) reads no layer bytes. After each layer the decision is attempted on the
 * layers seen so far; it stops as soon as no lower layer can change it, and in-flight downloads of
 * lower layers are then aborted.
 *
 * Overlay semantics implemented (OCI image layer spec, as containerd applies layers):
 * - a path takes its entry from the top-most layer that has one; an upper file, symlink or
 *   whiteout (`.wh.<name>`) hides lower entries at that path and under it;
 * - an opaque directory (`.wh..wh..opq`) hides the lower layers' content of that directory;
 * - directories merge; an upper directory replaces a lower non-directory;
 * - symlinked path components are followed (relative and absolute targets, clamped at the image
 *   root, at most `maxSymlinkHops`): merged /usr (`lib -> usr/lib`) makes `/lib/modules/K` be
 *   `/usr/lib/modules/K`. An upper layer whose tar spells a path through a lower layer's symlink
 *   (`lib/modules/K/x.ko` without an entry for `lib`) is found at the symlink's target, as
 *   containerd writes it there.
 */
import type { Logger } from 'pino';
import { parseImageReference, withDefaultTag, type ImageReference } from '../image/reference.ts';
import { RegistryError, type Descriptor, type RegistryClient, type RegistryErrorCode } from '../registry/types.ts';
import type { LayerCache } from './layer-cache.ts';
import {
  DEFAULT_LAYER_SCAN_LIMITS,
  isScanReusable,
  normalizeEntryPath,
  scanLayer,
  type LayerEntry,
  type LayerFileEntry,
  type LayerScanLimits,
  type LayerScanResult,
} from './layer-scan.ts';
import { findInModulesDep, isModuleFileName, moduleNameFromPath, normalizeModuleName } from './modinfo.ts';
import type { ImageStage, ImageStageInput, StageOutcome } from './types.ts';

export interface ImageStageLimits extends LayerScanLimits {
  /** Layers downloaded at once, the next ones below the one being decided (default 1). */
  readonly layerConcurrency: number;
  /** Symlinks followed while resolving one path (default 40, as Linux). */
  readonly maxSymlinkHops: number;
}

export const DEFAULT_IMAGE_STAGE_LIMITS: ImageStageLimits = {
  ...DEFAULT_LAYER_SCAN_LIMITS,
  layerConcurrency: 1,
  maxSymlinkHops: 40,
};

export interface ImageStageOptions {
  readonly registry: RegistryClient;
  readonly cache: LayerCache;
  readonly logger?: Logger;
  readonly limits?: Partial<ImageStageLimits>;
}

/** Counters for metrics and tests. */
export interface ImageStageStats {
  /** Layer scans answered by the cache. */
  cacheHits: number;
  /** Layers downloaded and scanned to their end. */
  layersScanned: number;
  /** Layer downloads aborted because the decision was made (or the caller gave up). */
  layersAborted: number;
  /** Scans that joined a download already under way for another validation. */
  sharedScans: number;
}

export interface ImageStageWithStats extends ImageStage {
  readonly stats: Readonly<ImageStageStats>;
}

// ---------------------------------------------------------------------------------------------
// Layer index and merged view

interface LayerIndex {
  readonly digest: string;
  readonly entries: ReadonlyMap<string, LayerEntry>;
  readonly whiteouts: ReadonlySet<string>;
  readonly opaque: ReadonlySet<string>;
  /** Directories implied by the paths of recorded entries, whiteouts and opaque markers. */
  readonly implicitDirs: ReadonlySet<string>;
  /** Normalised module name → paths of non-directory entries with that module file name. */
  readonly modulesByName: ReadonlyMap<string, readonly string[]>;
}

const indexes = new WeakMap<LayerScanResult, LayerIndex>();

function indexOf(scan: LayerScanResult): LayerIndex {
  const known = indexes.get(scan);
  if (known) return known;
  const entries = new Map<string, LayerEntry>(Object.entries(scan.entries));
  const implicitDirs = new Set<string>();
  const addParents = (path: string): void => {
    for (let i = path.lastIndexOf('/'); i > 0; i = path.lastIndexOf('/', i - 1)) {
      const dir = path.slice(0, i);
      if (implicitDirs.has(dir)) return;
      implicitDirs.add(dir);
    }
  };
  const modulesByName = new Map<string, string[]>();
  for (const [path, e] of entries) {
    addParents(path);
    if (e.type !== 'dir' && isModuleFileName(path)) {
      const name = moduleNameFromPath(path);
      const list = modulesByName.get(name);
      if (list) list.push(path);
      else modulesByName.set(name, [path]);
    }
  }
  for (const w of scan.whiteouts) addParents(w);
  for (const o of scan.opaqueDirs) {
    if (o !== '') implicitDirs.add(o);
    addParents(o);
  }
  const index: LayerIndex = {
    digest: scan.digest,
    entries,
    whiteouts: new Set(scan.whiteouts),
    opaque: new Set(scan.opaqueDirs),
    implicitDirs,
    modulesByName,
  };
  indexes.set(scan, index);
  return index;
}

/** Thrown when an answer needs a layer below the ones scanned so far. */
class NeedMoreLayers extends Error {}
const NEED_MORE = new NeedMoreLayers('need more layers');

class TooManySymlinks extends Error {}

/** A directory taken for a plain one turned out to be a lower layer's symlink: resolve again. */
class Restart extends Error {}
const RESTART = new Restart('restart');

/** A spelling of a path valid in layers whose index (0 = top) is below `below`. */
interface Alias {
  readonly path: string;
  readonly below: number;
}

/**
 * A directory that layer `layer` holds only implicitly (it has entries under `parent/name` but no
 * entry for it). It is taken for a plain directory as long as nothing below `layer` is consulted;
 * below, a lower layer's symlink there would win (containerd writes through it).
 */
interface Tentative {
  readonly parent: Dir;
  readonly name: string;
  readonly layer: number;
}

/** A directory of the merged view: its canonical path and other spellings (through symlinks). */
interface Dir {
  readonly path: string;
  readonly aliases: readonly Alias[];
  readonly tentative: readonly Tentative[];
}

const ROOT: Dir = { path: '', aliases: [], tentative: [] };

type Found =
  | { readonly kind: 'absent' }
  | { readonly kind: 'dir'; readonly implicitAt?: number }
  | { readonly kind: 'symlink'; readonly target: string; readonly layer: number }
  | { readonly kind: 'entry'; readonly entry: Exclude<LayerEntry, { type: 'dir' | 'symlink' }>; readonly layer: number; readonly path: string };

export interface ResolvedFile {
  readonly entry: LayerFileEntry;
  /** Index of the layer (0 = top) and its digest. */
  readonly layer: number;
  readonly digest: string;
  /** Path in that layer. */
  readonly path: string;
}

const join = (dir: string, name: string): string => (dir === '' ? name : `${dir}/${name}`);

function splitPath(path: string): string[] {
  return path.split('/').filter((p) => p !== '' && p !== '.');
}

/** Joins a symlink target to the directory holding the link, clamping `..` at the root. */
function symlinkTarget(parent: string, target: string): string[] {
  const out = target.startsWith('/') ? [] : splitPath(parent);
  for (const part of target.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') out.pop();
    else out.push(part);
  }
  return out;
}

/**
 * The merged filesystem of the top `layers.length` layers of an image; with `complete` false,
 * anything that depends on a lower layer throws {@link NeedMoreLayers}.
 */
class MergedView {
  private readonly layers: readonly LayerIndex[];
  private readonly complete: boolean;
  private readonly maxHops: number;
  private hops = 0;
  /** What lies below an implicit directory (see {@link Tentative}), by `parent\0name`. */
  private readonly belowImplicit = new Map<string, Found>();

  constructor(layers: readonly LayerIndex[], complete: boolean, maxHops: number) {
    this.layers = layers;
    this.complete = complete;
    this.maxHops = maxHops;
  }

  private layer(i: number): LayerIndex | undefined {
    if (i < this.layers.length) return this.layers[i];
    if (this.complete) return undefined;
    throw NEED_MORE;
  }

  digestOf(i: number): string {
    return this.layers[i]?.digest ?? '';
  }

  /**
   * Runs `fn` until it completes without discovering that a directory it took for plain is a
   * lower layer's symlink (each discovery is remembered, so this ends).
   */
  settle<T>(fn: () => T): T {
    for (let attempt = 0; ; attempt++) {
      try {
        this.hops = 0;
        return fn();
      } catch (err) {
        if (err !== RESTART || attempt > 1000) throw err;
      }
    }
  }

  private static spellings(dir: Dir, name: string, layer: number): string[] {
    const out = [join(dir.path, name)];
    for (const a of dir.aliases) if (layer < a.below) out.push(join(a.path, name));
    return out;
  }

  /** Whether layer `L` hides what lower layers hold at `path` (or under it). */
  private static hides(L: LayerIndex, path: string): boolean {
    if (L.whiteouts.has(path)) return true;
    if (L.opaque.has('')) return true;
    for (let i = path.indexOf('/'); i !== -1; i = path.indexOf('/', i + 1)) {
      const ancestor = path.slice(0, i);
      if (L.whiteouts.has(ancestor) || L.opaque.has(ancestor)) return true;
      const e = L.entries.get(ancestor);
      if (e && e.type !== 'dir') return true;
    }
    return false;
  }

  /** Whether layer `L` hides everything lower layers hold under directory `dir`. */
  private static hidesSubtree(L: LayerIndex, dir: string): boolean {
    if (dir === '') return L.opaque.has('');
    if (L.opaque.has(dir)) return true;
    const e = L.entries.get(dir);
    if (e && e.type !== 'dir') return true;
    return MergedView.hides(L, dir);
  }

  /** Before consulting layer `j` for content of `dir`: are its implicit directories still plain? */
  private checkTentative(dir: Dir, j: number): void {
    for (const m of dir.tentative) {
      if (j <= m.layer) continue;
      const key = `${m.parent.path}\0${m.name}`;
      let below = this.belowImplicit.get(key);
      if (!below) {
        below = this.belowImplicitDir(m.parent, m.name, m.layer);
        this.belowImplicit.set(key, below);
      }
      if (below.kind === 'symlink') throw RESTART;
    }
  }

  /** The top-most entry for `name` in directory `dir`. */
  private lookupChild(dir: Dir, name: string): Found {
    for (let i = 0; ; i++) {
      const L = this.layer(i);
      if (!L) return { kind: 'absent' };
      this.checkTentative(dir, i);
      const spellings = MergedView.spellings(dir, name, i);
      let implicit = false;
      for (const s of spellings) {
        const e = L.entries.get(s);
        if (e) {
          if (e.type === 'dir') return { kind: 'dir' };
          if (e.type === 'symlink') return { kind: 'symlink', target: e.target, layer: i };
          return { kind: 'entry', entry: e, layer: i, path: s };
        }
        if (L.implicitDirs.has(s)) implicit = true;
      }
      if (implicit) {
        const below = this.belowImplicit.get(`${dir.path}\0${name}`);
        if (below?.kind === 'symlink') return below;
        return { kind: 'dir', implicitAt: i };
      }
      for (const s of spellings) if (MergedView.hides(L, s)) return { kind: 'absent' };
    }
  }

  /**
   * Layer `top` has entries under `dir/name` but no entry for it: containerd wrote them through
   * whatever lower layers have there, so a lower symlink is still followed.
   */
  private belowImplicitDir(dir: Dir, name: string, top: number): Found {
    for (const s of MergedView.spellings(dir, name, top)) if (MergedView.hides(this.layers[top]!, s)) return { kind: 'dir' };
    for (let i = top + 1; ; i++) {
      const L = this.layer(i);
      if (!L) return { kind: 'dir' };
      this.checkTentative(dir, i);
      const spellings = MergedView.spellings(dir, name, i);
      for (const s of spellings) {
        const e = L.entries.get(s);
        if (e?.type === 'symlink') return { kind: 'symlink', target: e.target, layer: i };
        if (e || L.implicitDirs.has(s)) return { kind: 'dir' };
      }
      for (const s of spellings) if (MergedView.hides(L, s)) return { kind: 'dir' };
    }
  }

  private child(dir: Dir, name: string, implicitAt: number | undefined): Dir {
    return {
      path: join(dir.path, name),
      aliases: dir.aliases.map((a) => ({ path: join(a.path, name), below: a.below })),
      tentative: implicitAt === undefined ? dir.tentative : [...dir.tentative, { parent: dir, name, layer: implicitAt }],
    };
  }

  private follow(dir: Dir, name: string, target: string, layer: number): Dir | undefined {
    if (++this.hops > this.maxHops) throw new TooManySymlinks();
    const resolved = this.resolveDir(symlinkTarget(dir.path, target));
    if (!resolved) return undefined;
    // Upper layers may spell paths under the target through the link (see belowImplicitDir).
    const aliases: Alias[] = [...resolved.aliases, { path: join(dir.path, name), below: layer }];
    for (const a of dir.aliases) aliases.push({ path: join(a.path, name), below: Math.min(a.below, layer) });
    return { path: resolved.path, aliases, tentative: [...resolved.tentative, ...dir.tentative] };
  }

  /** The directory at `parts` from the root, following symlinks; undefined when absent. Use within {@link settle}. */
  dirAt(parts: readonly string[]): Dir | undefined {
    return this.resolveDir(parts);
  }

  /** The file at `rel` (relative) under `dir`, following symlinks and hard links; undefined when absent. Use within {@link settle}. */
  fileAt(dir: Dir, rel: string): ResolvedFile | undefined {
    return this.resolveFile(dir, rel);
  }

  private resolveDir(parts: readonly string[], from: Dir = ROOT): Dir | undefined {
    let cur: Dir = from;
    for (const name of parts) {
      const next = this.resolveDirFrom(cur, name);
      if (!next) return undefined;
      cur = next;
    }
    return cur;
  }

  private resolveDirFrom(dir: Dir, name: string): Dir | undefined {
    const found = this.lookupChild(dir, name);
    switch (found.kind) {
      case 'absent':
      case 'entry':
        return undefined;
      case 'dir':
        return this.child(dir, name, found.implicitAt);
      case 'symlink':
        return this.follow(dir, name, found.target, found.layer);
    }
  }

  private resolveFile(dir: Dir, rel: string): ResolvedFile | undefined {
    const parts = splitPath(rel);
    const last = parts.pop();
    if (last === undefined) return undefined;
    const parent = this.resolveDir(parts, dir);
    if (!parent) return undefined;
    const found = this.lookupChild(parent, last);
    switch (found.kind) {
      case 'absent':
      case 'dir':
        return undefined;
      case 'symlink': {
        if (++this.hops > this.maxHops) throw new TooManySymlinks();
        return this.resolveFile(ROOT, symlinkTarget(parent.path, found.target).join('/'));
      }
      case 'entry': {
        const e = found.entry;
        if (e.type === 'file') return { entry: e, layer: found.layer, digest: this.digestOf(found.layer), path: found.path };
        if (e.type === 'hardlink') {
          if (++this.hops > this.maxHops) throw new TooManySymlinks();
          return this.resolveFile(ROOT, e.target);
        }
        return undefined;
      }
    }
  }

  /**
   * Paths (relative to `dir`) of every entry named like module `wanted` anywhere under `dir`, in
   * any layer that can show through. Needs every layer down to one that hides the whole directory.
   */
  moduleCandidates(dir: Dir, wanted: string): string[] {
    const out = new Set<string>();
    for (let i = 0; ; i++) {
      const L = this.layer(i);
      if (!L) break;
      this.checkTentative(dir, i);
      const prefixes = [dir.path, ...dir.aliases.filter((a) => i < a.below).map((a) => a.path)];
      for (const path of L.modulesByName.get(wanted) ?? []) {
        for (const prefix of prefixes) {
          if (prefix === '') out.add(path);
          else if (path.startsWith(`${prefix}/`)) out.add(path.slice(prefix.length + 1));
        }
      }
      if (prefixes.some((p) => MergedView.hidesSubtree(L, p))) break;
    }
    return [...out];
  }
}

// ---------------------------------------------------------------------------------------------
// Decision

/** depmod's default search order: `updates/` first, then the rest (`extra/` before the kernel's own). */
function candidateRank(rel: string): [number, number, string] {
  const first = rel.split('/')[0];
  const rank = first === 'updates' ? 0 : first === 'extra' ? 1 : 2;
  return [rank, rel.split('/').length, rel];
}

function compareCandidates(a: string, b: string): number {
  const [ra, da, sa] = candidateRank(a);
  const [rb, db, sb] = candidateRank(b);
  return ra - rb || da - db || (sa < sb ? -1 : sa > sb ? 1 : 0);
}

interface DecisionInput {
  readonly image: string;
  readonly module: string;
  readonly kernel: string;
  /** Requested kernel directory, normalised without leading `/`. */
  readonly kernelDirParts: readonly string[];
}

function display(path: string): string {
  return `/${path}`;
}

function fileName(rel: string): string {
  return rel.slice(rel.lastIndexOf('/') + 1);
}

function builtFor(vermagic: string): string {
  return vermagic.split(' ')[0] ?? vermagic;
}

/** Throws NeedMoreLayers when the layers seen so far cannot decide. */
function decide(view: MergedView, q: DecisionInput): StageOutcome {
  return view.settle(() => decideOnce(view, q));
}

function decideOnce(view: MergedView, q: DecisionInput): StageOutcome {
  const requested = display(q.kernelDirParts.join('/'));
  const dir = view.dirAt(q.kernelDirParts);
  if (!dir) {
    return {
      status: 'False',
      code: 'ModuleNotFound',
      reason: `module ${q.module} not found in image ${q.image}: there is no directory ${requested}/`,
    };
  }
  const searched = dir.path === q.kernelDirParts.join('/') ? `${requested}/` : `${requested}/ (resolved to ${display(dir.path)}/)`;
  const wanted = normalizeModuleName(q.module);

  const dep = view.fileAt(dir, 'modules.dep');
  const depInfo = dep?.entry.modulesDep;
  const listed = depInfo ? findInModulesDep(depInfo, wanted, display(dir.path)) : undefined;
  let chosen: { rel: string; file: ResolvedFile } | undefined;
  if (listed !== undefined) {
    const file = view.fileAt(dir, listed);
    if (file) chosen = { rel: listed, file };
  }
  if (!chosen) {
    const found: { rel: string; file: ResolvedFile }[] = [];
    for (const rel of view.moduleCandidates(dir, wanted).sort(compareCandidates)) {
      const file = view.fileAt(dir, rel);
      if (file) found.push({ rel, file });
    }
    chosen = found[0];
  }
  if (!chosen) {
    if (listed !== undefined) {
      return {
        status: 'False',
        code: 'ModuleNotFound',
        reason: `module ${q.module} not found in image ${q.image} under ${searched}: modules.dep lists ${listed}, which is not in the image`,
      };
    }
    return {
      status: 'False',
      code: 'ModuleNotFound',
      reason: `module ${q.module} not found in image ${q.image} under ${searched}`,
    };
  }

  const { rel, file } = chosen;
  const base = fileName(rel);
  if (file.entry.error !== undefined || !file.entry.module) {
    return {
      status: 'False',
      code: 'ModuleUnreadable',
      reason: `module file ${rel} in image ${q.image} cannot be read: ${file.entry.error ?? 'its content was not examined'}`,
    };
  }
  const vermagic = file.entry.module.vermagic;
  if (vermagic === undefined) {
    return {
      status: 'False',
      code: 'ModuleUnreadable',
      reason: `module file ${rel} in image ${q.image} has no vermagic in its .modinfo section: it is not a loadable kernel module`,
    };
  }
  if (vermagic !== q.kernel && !vermagic.startsWith(`${q.kernel} `)) {
    return {
      status: 'False',
      code: 'VermagicMismatch',
      reason: `module ${base} in image ${q.image} was built for ${builtFor(vermagic)}, not ${q.kernel}`,
    };
  }
  if (!dep) {
    return {
      status: 'False',
      code: 'ModulesDepMissing',
      reason: `depmod was not run for ${q.kernel} in image ${q.image}: there is no ${searched}modules.dep`,
    };
  }
  if (!depInfo) {
    return {
      status: 'False',
      code: 'ModulesDepMissing',
      reason: `modules.dep for ${q.kernel} in image ${q.image} cannot be read: ${dep.entry.error ?? 'its content was not examined'}`,
    };
  }
  if (listed === undefined) {
    return {
      status: 'False',
      code: 'ModuleNotInModulesDep',
      reason: `modules.dep for ${q.kernel} in image ${q.image} does not list ${rel}: run depmod after adding the module`,
    };
  }
  if (listed !== rel) {
    return {
      status: 'False',
      code: 'ModuleNotInModulesDep',
      reason: `modules.dep for ${q.kernel} in image ${q.image} lists ${listed}, which is not in the image, and not ${rel}: run depmod after adding the module`,
    };
  }
  return {
    status: 'True',
    code: 'Verified',
    reason: `module ${q.module} found in image ${q.image} for kernel ${q.kernel} (${rel}, vermagic ok)`,
  };
}

// ---------------------------------------------------------------------------------------------
// Registry errors

interface ErrorMapping {
  readonly status: 'False' | 'Error';
  readonly code: string;
}

const IMAGE_ERRORS: Record<RegistryErrorCode, ErrorMapping> = {
  NotFound: { status: 'False', code: 'ImageNotFound' },
  Unauthorized: { status: 'False', code: 'ImageUnauthorized' },
  NoMatchingPlatform: { status: 'False', code: 'ImagePlatformNotFound' },
  DigestMismatch: { status: 'False', code: 'ImageDigestMismatch' },
  Invalid: { status: 'False', code: 'ImageInvalid' },
  TooLarge: { status: 'False', code: 'ImageInvalid' },
  Unreachable: { status: 'Error', code: 'RegistryUnreachable' },
  Timeout: { status: 'Error', code: 'RegistryTimeout' },
  RateLimited: { status: 'Error', code: 'RegistryRateLimited' },
  ServerError: { status: 'Error', code: 'RegistryServerError' },
};

const LAYER_ERRORS: Record<RegistryErrorCode, ErrorMapping> = {
  ...IMAGE_ERRORS,
  NotFound: { status: 'False', code: 'LayerNotFound' },
  DigestMismatch: { status: 'False', code: 'LayerDigestMismatch' },
  Invalid: { status: 'False', code: 'LayerInvalid' },
  TooLarge: { status: 'False', code: 'LayerTooLarge' },
};

function imageErrorOutcome(err: RegistryError, image: string, platform: string): StageOutcome {
  const m = IMAGE_ERRORS[err.code] ?? { status: 'Error', code: 'RegistryError' };
  let reason: string;
  switch (err.code) {
    case 'NotFound':
      reason = `image ${image} not found`;
      break;
    case 'Unauthorized':
      reason = `image ${image} cannot be read with the pull secret: access denied by ${err.registry}`;
      break;
    case 'NoMatchingPlatform':
      reason = `image ${image} has no manifest for ${platform}`;
      break;
    default:
      reason = `image ${image}: ${err.message}`;
  }
  return { status: m.status, code: m.code, reason };
}

function layerErrorOutcome(err: RegistryError, image: string, digest: string): StageOutcome {
  const m = LAYER_ERRORS[err.code] ?? { status: 'Error', code: 'RegistryError' };
  let reason: string;
  switch (err.code) {
    case 'NotFound':
      reason = `layer ${digest} of image ${image} not found in the registry`;
      break;
    case 'Unauthorized':
      reason = `layer ${digest} of image ${image} cannot be read with the pull secret: access denied by ${err.registry}`;
      break;
    case 'DigestMismatch':
      reason = `layer ${digest} of image ${image} does not match its digest`;
      break;
    default:
      reason = `layer ${digest} of image ${image}: ${err.message}`;
  }
  return { status: m.status, code: m.code, reason };
}

// ---------------------------------------------------------------------------------------------
// The stage

/** A download shared by the validations that need the same layer at the same time. */
interface Flight {
  readonly promise: Promise<LayerScanResult>;
  readonly controller: AbortController;
  waiters: number;
  settled: boolean;
}

function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('The operation was aborted', 'AbortError');
}

/** Settles with `promise`, or rejects when `signal` aborts first. */
function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(abortReason(signal));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(abortReason(signal));
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

export function createImageStage(options: ImageStageOptions): ImageStageWithStats {
  const { registry, cache, logger } = options;
  const limits: ImageStageLimits = { ...DEFAULT_IMAGE_STAGE_LIMITS, ...options.limits };
  const scanLimits: LayerScanLimits = {
    maxUncompressedBytes: limits.maxUncompressedBytes,
    maxCandidateBytes: limits.maxCandidateBytes,
    maxEntries: limits.maxEntries,
    maxRecordedEntries: limits.maxRecordedEntries,
    zstdWindowLogMax: limits.zstdWindowLogMax,
  };
  const stats: ImageStageStats = { cacheHits: 0, layersScanned: 0, layersAborted: 0, sharedScans: 0 };
  const flights = new Map<string, Flight>();

  async function cached(digest: string): Promise<LayerScanResult | undefined> {
    try {
      const hit = await cache.get(digest);
      if (hit && hit.digest === digest && isScanReusable(hit, scanLimits)) return hit;
    } catch (err) {
      logger?.warn({ err, digest }, 'layer cache read failed');
    }
    return undefined;
  }

  function download(ref: ImageReference, descriptor: Descriptor, input: ImageStageInput): Flight {
    const controller = new AbortController();
    const signal = controller.signal;
    const promise = (async () => {
      const blob = await registry.openBlob(ref, descriptor, input.access, { signal });
      const result = await scanLayer(blob, { digest: descriptor.digest, limits: scanLimits, signal });
      stats.layersScanned++;
      try {
        await cache.set(descriptor.digest, result);
      } catch (err) {
        logger?.warn({ err, digest: descriptor.digest }, 'layer cache write failed');
      }
      logger?.debug(
        {
          digest: descriptor.digest,
          compressedBytes: result.compressedBytes,
          uncompressedBytes: result.uncompressedBytes,
          entries: result.entryCount,
          refused: result.refused?.code,
        },
        'layer scanned',
      );
      return result;
    })();
    const flight: Flight = { promise, controller, waiters: 0, settled: false };
    promise.then(
      () => undefined,
      () => undefined,
    ).finally(() => {
      flight.settled = true;
      if (flights.get(descriptor.digest) === flight) flights.delete(descriptor.digest);
    });
    return flight;
  }

  /** The scan of one layer: cache, a shared download under way, or a new download. */
  async function layerScan(ref: ImageReference, descriptor: Descriptor, input: ImageStageInput, signal: AbortSignal): Promise<LayerScanResult> {
    const hit = await cached(descriptor.digest);
    if (hit) {
      stats.cacheHits++;
      return hit;
    }
    if (signal.aborted) throw abortReason(signal);
    let flight = flights.get(descriptor.digest);
    if (flight && !flight.controller.signal.aborted) {
      stats.sharedScans++;
    } else {
      flight = download(ref, descriptor, input);
      flights.set(descriptor.digest, flight);
    }
    flight.waiters++;
    const f = flight;
    try {
      return await raceAbort(f.promise, signal);
    } finally {
      f.waiters--;
      if (f.waiters === 0 && !f.settled) {
        stats.layersAborted++;
        f.controller.abort(new DOMException('no validation needs this layer any more', 'AbortError'));
        if (flights.get(descriptor.digest) === f) flights.delete(descriptor.digest);
      }
    }
  }

  async function run(input: ImageStageInput): Promise<StageOutcome> {
    input.signal?.throwIfAborted();
    let ref: ImageReference;
    try {
      ref = withDefaultTag(parseImageReference(input.image));
    } catch (err) {
      return { status: 'False', code: 'ImageReferenceInvalid', reason: (err as Error).message };
    }
    const dirParts = normalizeEntryPath(input.dirName || '/opt');
    if (dirParts === undefined || input.kernel === '' || input.kernel.includes('/') || input.kernel === '..' || input.kernel === '.') {
      return {
        status: 'False',
        code: 'InvalidInput',
        reason: `cannot look for modules under ${input.dirName}/lib/modules/${input.kernel}: not a valid directory`,
      };
    }
    const kernelDirParts = [...splitPath(dirParts), 'lib', 'modules', input.kernel];
    const platform = `${input.platform.os}/${input.platform.architecture}${input.platform.variant ? `/${input.platform.variant}` : ''}`;

    let resolved;
    try {
      resolved = await registry.resolveImage(ref, input.access, input.platform, input.signal ? { signal: input.signal } : {});
    } catch (err) {
      input.signal?.throwIfAborted();
      if (err instanceof RegistryError) return imageErrorOutcome(err, input.image, platform);
      return { status: 'Error', code: 'InternalError', reason: `image ${input.image}: ${(err as Error).message}` };
    }

    const layers = [...resolved.layers].reverse(); // top first
    const q: DecisionInput = { image: input.image, module: input.moduleName, kernel: input.kernel, kernelDirParts };
    const done = new AbortController();
    const onCallerAbort = (): void => done.abort(abortReason(input.signal!));
    input.signal?.addEventListener('abort', onCallerAbort, { once: true });
    const pending: Promise<LayerScanResult>[] = [];
    const start = (i: number): void => {
      if (i >= layers.length || pending[i]) return;
      const p = layerScan(ref, layers[i]!, input, done.signal);
      p.catch(() => undefined); // observed below, or abandoned after the decision
      pending[i] = p;
    };
    const seen: LayerIndex[] = [];
    try {
      for (let i = 0; i <= layers.length; i++) {
        if (i > 0 || layers.length === 0) {
          const view = new MergedView(seen, i === layers.length, limits.maxSymlinkHops);
          try {
            const outcome = decide(view, q);
            logger?.debug({ image: input.image, layersRead: i, of: layers.length, code: outcome.code }, 'image stage decided');
            return outcome;
          } catch (err) {
            if (err instanceof TooManySymlinks) {
              return {
                status: 'False',
                code: 'ModuleNotFound',
                reason: `module ${q.module} not found in image ${q.image}: too many levels of symbolic links under /${kernelDirParts.join('/')}`,
              };
            }
            if (!(err instanceof NeedMoreLayers)) throw err;
          }
        }
        for (let j = i; j < i + Math.max(1, limits.layerConcurrency); j++) start(j);
        const descriptor = layers[i]!;
        let scan: LayerScanResult;
        try {
          scan = await pending[i]!;
        } catch (err) {
          input.signal?.throwIfAborted();
          if (err instanceof RegistryError) return layerErrorOutcome(err, input.image, descriptor.digest);
          return {
            status: 'Error',
            code: 'LayerReadFailed',
            reason: `layer ${descriptor.digest} of image ${input.image} could not be read: ${(err as Error).message}`,
          };
        }
        if (scan.refused) {
          return {
            status: 'False',
            code: scan.refused.code === 'DecompressionLimit' || scan.refused.code === 'TooManyEntries' ? 'LayerTooLarge' : 'LayerInvalid',
            reason: `image ${input.image}: ${scan.refused.reason}`,
          };
        }
        seen.push(indexOf(scan));
      }
      throw new Error('unreachable: every layer scanned without a decision');
    } finally {
      input.signal?.removeEventListener('abort', onCallerAbort);
      if (!done.signal.aborted) done.abort(new DOMException('decided', 'AbortError'));
    }
  }

  return { run, stats };
}
