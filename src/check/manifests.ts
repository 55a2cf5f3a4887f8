/**
 * Module manifests for the offline `check` command: YAML or JSON files (several documents each,
 * `kind: List` included) or directories of them. KMM Modules are collected, and the pull-secret
 * Secrets among them are kept so that a Module's `imageRepoSecret` can be found.
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
  /** Documents that are neither (reported, not fatal). */
  readonly ignored: readonly string[];
}

const MANIFEST_EXTENSIONS = new Set(['.yaml', '.yml', '.json']);

async function filesOf(path: string): Promise<string[]> {
  let info;
  try {
    info = await stat(path);
  } catch {
    throw new InputError(`${path}: no such file or directory`);
  }
  if (info.isFile()) return [path];
  const out: string[] = [];
  for (const entry of (await readdir(path, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
    const p = join(path, entry.name);
    if (entry.isDirectory()) out.push(...(await filesOf(p)));
    else if (MANIFEST_EXTENSIONS.has(extname(entry.name))) out.push(p);
  }
  return out;
}

function documentsOf(text: string, file: string): unknown[] {
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

export async function loadManifests(paths: readonly string[]): Promise<ManifestSet> {
  const modules: KmmModule[] = [];
  const pullSecrets = new Map<string, string>();
  const ignored: string[] = [];
  const problems: string[] = [];
  const seen = new Set<string>();
  for (const path of paths) {
    for (const file of await filesOf(path)) {
      const docs = documentsOf(await readFile(file, 'utf8'), file);
      docs.forEach((doc, i) => {
        const o = doc as { apiVersion?: string; kind?: string; metadata?: { name?: string; namespace?: string }; type?: string; data?: Record<string, string>; stringData?: Record<string, string> };
        const where = `${file} (document ${i + 1})`;
        if (o?.kind === 'Module' && typeof o.apiVersion === 'string' && o.apiVersion.startsWith('kmm.sigs.x-k8s.io/')) {
          const parsed = parseModule(doc, { defaultNamespace: 'default' });
          if (!parsed.ok) {
            problems.push(...parsed.errors.map((e) => `${where}: ${e}`));
            return;
          }
          const m = parsed.module;
          const key = `${m.metadata.namespace ?? 'default'}/${m.metadata.name}`;
          if (seen.has(key)) {
            problems.push(`${where}: Module ${key} is defined twice`);
            return;
          }
          seen.add(key);
          modules.push(m);
        } else if (o?.kind === 'Secret' && o.type === 'kubernetes.io/dockerconfigjson') {
          const encoded = o.data?.['.dockerconfigjson'];
          const plain = o.stringData?.['.dockerconfigjson'] ?? (encoded ? Buffer.from(encoded, 'base64').toString('utf8') : undefined);
          if (plain) pullSecrets.set(`${o.metadata?.namespace ?? 'default'}/${o.metadata?.name ?? ''}`, plain);
        } else {
          ignored.push(`${where}: ${o?.apiVersion ?? '?'} ${o?.kind ?? '?'} ${o?.metadata?.name ?? ''}`.trim());
        }
      });
    }
  }
  if (problems.length > 0) throw new InputError(problems.join('\n'));
  return { modules, pullSecrets, ignored };
}
