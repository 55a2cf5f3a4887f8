/**
 * Module manifests from files: YAML or JSON files (several documents each, `kind: List`
 * included) or directories of them. Used by the offline `check` command (`loadManifests`: all or
 * nothing) and by the controller's stand-alone mode (src/controller/directory-inputs.ts: file by
 * file, through `listManifestFiles`, `parseManifestDocuments` and `readManifestObject`).
 *
 * In a directory, entries whose name starts with `.` are skipped: hidden files and, above all,
 * the `..data` / `..<timestamp>` entries of a ConfigMap or Secret volume, whose files would
 * otherwise be read twice (once through the visible symlink, once in the timestamped directory).
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { extname, join } from 'node:path';
import YAML from 'yaml';
import { parseModule, type KmmModule } from '../engine/module.ts';

export class InputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InputError';
  }
}

export interface ManifestSet {
  readonly modules: readonly KmmModule[];
  /** `namespace/name` → `.dockerconfigjson` text of `kubernetes.io/dockerconfigjson` Secrets. */
  readonly pullSecrets: ReadonlyMap<string, string>;
  /** `namespace/name` → data of every Secret (signing keys and certificates, build secrets). */
  readonly secrets: ReadonlyMap<string, Readonly<Record<string, Buffer>>>;
  /** `namespace/name` → data of every ConfigMap (Dockerfiles of build sections). */
  readonly configMaps: ReadonlyMap<string, Readonly<Record<string, string>>>;
  /** Documents that are neither (reported, not fatal). */
  readonly ignored: readonly string[];
}

export const MANIFEST_EXTENSIONS: ReadonlySet<string> = new Set(['.yaml', '.yml', '.json']);

/** The namespace of an object that names none (what `kubectl apply -f` uses with no context namespace). */
export const DEFAULT_MANIFEST_NAMESPACE = 'default';

export interface ManifestListing {
  /** Manifest files, in a stable order (a directory's entries sorted by name, depth first). */
  readonly files: readonly string[];
  /** The directories walked (the path itself when it is one): what to watch for changes. */
  readonly directories: readonly string[];
}

/** The manifest files of a file or directory path; throws InputError when `path` does not exist. */
export async function listManifestFiles(path: string): Promise<ManifestListing> {
  let info;
  try {
    info = await stat(path);
  } catch {
    throw new InputError(`${path}: no such file or directory`);
  }
  if (info.isFile()) return { files: [path], directories: [] };
  const files: string[] = [];
  const directories: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    directories.push(dir);
    for (const entry of (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
      if (entry.name.startsWith('.')) continue;
      const p = join(dir, entry.name);
      if (entry.isDirectory()) await walk(p);
      else if (MANIFEST_EXTENSIONS.has(extname(entry.name))) files.push(p);
    }
  };
  await walk(path);
  return { files, directories };
}

/** The documents of a YAML/JSON text, `kind: List` flattened; throws InputError on a syntax error. */
export function parseManifestDocuments(text: string, file: string): unknown[] {
  const docs = YAML.parseAllDocuments(text);
  const out: unknown[] = [];
  docs.forEach((doc, i) => {
    if (doc.errors.length > 0) throw new InputError(`${file}: document ${i + 1}: ${doc.errors[0]!.message}`);
    const value = doc.toJS({ maxAliasCount: 100 }) as unknown;
    if (value === null || value === undefined) return;
    const list = value as { kind?: string; items?: unknown[] };
    if (list.kind === 'List' && Array.isArray(list.items)) out.push(...list.items);
    else out.push(value);
  });
  return out;
}

/** One manifest document, classified. Keys are `namespace/name`. */
export type ManifestObject =
  | { readonly kind: 'Module'; readonly key: string; readonly module: KmmModule }
  | {
      readonly kind: 'Secret';
      readonly key: string;
      readonly type: string;
      /** `data` decoded, with `stringData` over it (as kube-apiserver merges them). */
      readonly data: Readonly<Record<string, Buffer>>;
    }
  | { readonly kind: 'ConfigMap'; readonly key: string; readonly data: Readonly<Record<string, string>> }
  /** A Module, Secret or ConfigMap that cannot be used: each problem with its field path. */
  | { readonly kind: 'invalid'; readonly objectKind: 'Module' | 'Secret' | 'ConfigMap'; readonly key?: string; readonly errors: readonly string[] }
  /** Anything else: a one-line description. */
  | { readonly kind: 'ignored'; readonly description: string };

interface RawObject {
  apiVersion?: unknown;
  kind?: unknown;
  metadata?: { name?: unknown; namespace?: unknown };
  type?: unknown;
  data?: unknown;
  stringData?: unknown;
}

function stringRecord(v: unknown, path: string, errors: string[]): Record<string, string> {
  if (v === undefined || v === null) return {};
  if (typeof v !== 'object' || Array.isArray(v)) {
    errors.push(`${path}: must be an object`);
    return {};
  }
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val === 'string') out[k] = val;
    else errors.push(`${path}[${JSON.stringify(k)}]: must be a string`);
  }
  return out;
}

/** Classifies one document: a KMM Module (parsed), a Secret or a ConfigMap, or something else. */
export function readManifestObject(doc: unknown, options: { defaultNamespace?: string } = {}): ManifestObject {
  const defaultNamespace = options.defaultNamespace ?? DEFAULT_MANIFEST_NAMESPACE;
  const o = (typeof doc === 'object' && doc !== null ? doc : {}) as RawObject;
  const apiVersion = typeof o.apiVersion === 'string' ? o.apiVersion : undefined;
  const meta = typeof o.metadata === 'object' && o.metadata !== null ? o.metadata : {};
  const name = typeof meta.name === 'string' ? meta.name : undefined;
  const namespace = typeof meta.namespace === 'string' && meta.namespace !== '' ? meta.namespace : defaultNamespace;
  if (o.kind === 'Module' && apiVersion?.startsWith('kmm.sigs.x-k8s.io/')) {
    const parsed = parseModule(doc, { defaultNamespace });
    if (!parsed.ok) return { kind: 'invalid', objectKind: 'Module', ...(name ? { key: `${namespace}/${name}` } : {}), errors: parsed.errors };
    const m = parsed.module;
    return { kind: 'Module', key: `${m.metadata.namespace ?? defaultNamespace}/${m.metadata.name}`, module: m };
  }
  if ((o.kind === 'Secret' || o.kind === 'ConfigMap') && (apiVersion === 'v1' || apiVersion === undefined)) {
    const errors: string[] = [];
    if (!name) errors.push('metadata.name: required');
    const data = stringRecord(o.data, 'data', errors);
    if (o.kind === 'ConfigMap') {
      return errors.length > 0
        ? { kind: 'invalid', objectKind: 'ConfigMap', ...(name ? { key: `${namespace}/${name}` } : {}), errors }
        : { kind: 'ConfigMap', key: `${namespace}/${name}`, data };
    }
    const stringData = stringRecord(o.stringData, 'stringData', errors);
    if (o.type !== undefined && typeof o.type !== 'string') errors.push('type: must be a string');
    if (errors.length > 0) return { kind: 'invalid', objectKind: 'Secret', ...(name ? { key: `${namespace}/${name}` } : {}), errors };
    const decoded: Record<string, Buffer> = {};
    for (const [k, v] of Object.entries(data)) decoded[k] = Buffer.from(v, 'base64');
    for (const [k, v] of Object.entries(stringData)) decoded[k] = Buffer.from(v, 'utf8');
    return { kind: 'Secret', key: `${namespace}/${name}`, type: typeof o.type === 'string' && o.type !== '' ? o.type : 'Opaque', data: decoded };
  }
  return { kind: 'ignored', description: `${apiVersion ?? '?'} ${typeof o.kind === 'string' ? o.kind : '?'} ${name ?? ''}`.trim() };
}

export async function loadManifests(paths: readonly string[]): Promise<ManifestSet> {
  const modules: KmmModule[] = [];
  const pullSecrets = new Map<string, string>();
  const secrets = new Map<string, Readonly<Record<string, Buffer>>>();
  const configMaps = new Map<string, Readonly<Record<string, string>>>();
  const ignored: string[] = [];
  const problems: string[] = [];
  const seen = new Set<string>();
  for (const path of paths) {
    for (const file of (await listManifestFiles(path)).files) {
      const docs = parseManifestDocuments(await readFile(file, 'utf8'), file);
      docs.forEach((doc, i) => {
        const where = `${file} (document ${i + 1})`;
        const obj = readManifestObject(doc);
        switch (obj.kind) {
          case 'Module':
            if (seen.has(obj.key)) {
              problems.push(`${where}: Module ${obj.key} is defined twice`);
              return;
            }
            seen.add(obj.key);
            modules.push(obj.module);
            return;
          case 'Secret': {
            const text = obj.data['.dockerconfigjson']?.toString('utf8');
            if (obj.type === 'kubernetes.io/dockerconfigjson' && text) pullSecrets.set(obj.key, text);
            secrets.set(obj.key, obj.data);
            return;
          }
          case 'ConfigMap':
            configMaps.set(obj.key, obj.data);
            return;
          case 'invalid':
            // Only Modules matter to `check`; an unusable Secret or ConfigMap is reported as ignored.
            if (obj.objectKind === 'Module') problems.push(...obj.errors.map((e) => `${where}: ${e}`));
            else ignored.push(`${where}: v1 ${obj.objectKind} ${obj.key ?? ''} (${obj.errors.join('; ')})`.replace('  (', ' ('));
            return;
          case 'ignored':
            ignored.push(`${where}: ${obj.description}`);
            return;
        }
      });
    }
  }
  if (problems.length > 0) throw new InputError(problems.join('\n'));
  return { modules, pullSecrets, secrets, configMaps, ignored };
}
