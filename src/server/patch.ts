/**
 * Patch formats of the Kubernetes API other than server-side apply: JSON merge patch (RFC 7386),
 * JSON patch (RFC 6902, through fast-json-patch) and strategic merge patch.
 *
 * Strategic merge patch only differs from merge patch where a schema declares
 * `x-kubernetes-patch-strategy: merge`; these kinds declare none, so every list is replaced whole
 * and the patch reduces to a merge patch that honours SMP's `$patch`, `$retainKeys` and
 * `$setElementOrder` directives.
 */
import fastJsonPatch from 'fast-json-patch';
import { ApiError, errors } from './errors.ts';

type Json = unknown;
type JsonObject = Record<string, Json>;

export const PATCH_TYPES = {
  merge: 'application/merge-patch+json',
  json: 'application/json-patch+json',
  strategic: 'application/strategic-merge-patch+json',
  apply: 'application/apply-patch+yaml',
} as const;

export type PatchType = keyof typeof PATCH_TYPES;

export function patchTypeOf(contentType: string | undefined): PatchType | undefined {
  const mt = (contentType ?? '').split(';')[0]!.trim().toLowerCase();
  if (mt === 'application/apply-patch+json' || mt === 'application/apply-patch+yaml') return 'apply';
  for (const [k, v] of Object.entries(PATCH_TYPES)) if (v === mt) return k as PatchType;
  return undefined;
}

const isObject = (v: Json): v is JsonObject => v !== null && typeof v === 'object' && !Array.isArray(v);

/** RFC 7386: null deletes, objects merge recursively, everything else replaces. */
export function mergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return patch;
  const out: JsonObject = isObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

/** Strategic merge patch for schemas without merge-strategy lists; see the module comment. */
export function strategicMergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return patch;
  const directive = patch['$patch'];
  if (directive === 'delete') return undefined;
  const base: JsonObject = directive === 'replace' || !isObject(target) ? {} : { ...target };
  if (directive !== undefined && directive !== 'replace' && directive !== 'merge') {
    throw errors.badRequest(`unknown patch directive "$patch: ${String(directive)}"`);
  }
  const retain = patch['$retainKeys'];
  if (Array.isArray(retain)) {
    for (const k of Object.keys(base)) if (!retain.includes(k)) delete base[k];
  }
  for (const [k, v] of Object.entries(patch)) {
    if (k === '$patch' || k === '$retainKeys' || k.startsWith('$setElementOrder/') || k.startsWith('$deleteFromPrimitiveList/')) {
      continue;
    }
    if (v === null) {
      delete base[k];
      continue;
    }
    const merged = strategicMergePatch(base[k], v);
    if (merged === undefined) delete base[k];
    else base[k] = merged;
  }
  return base;
}

/** RFC 6902. A failing `test` operation is a 422 as in kube-apiserver; a malformed patch a 400. */
export function jsonPatch(target: Json, patch: Json): Json {
  if (!Array.isArray(patch)) throw errors.badRequest('a JSON patch must be an array of operations');
  const validationError = fastJsonPatch.validate(patch as fastJsonPatch.Operation[], target);
  if (validationError) {
    if (validationError.name === 'TEST_OPERATION_FAILED') {
      throw new ApiError('Invalid', `the JSON patch's test operation failed: ${validationError.message.split('\n')[0]}`);
    }
    throw errors.badRequest(`the JSON patch is invalid: ${validationError.message.split('\n')[0]}`);
  }
  try {
    return fastJsonPatch.applyPatch(structuredClone(target), patch as fastJsonPatch.Operation[], false, true)
      .newDocument;
  } catch (err) {
    const e = err as Error & { name?: string };
    throw errors.badRequest(`the JSON patch could not be applied: ${e.message.split('\n')[0]}`);
  }
}
