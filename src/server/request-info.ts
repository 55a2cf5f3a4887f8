/**
 * What a request is, in the terms of kube-apiserver's RequestInfo: the verb and resource
 * attributes that authorization, metrics and audit need, derived from method, path and query.
 */

export interface RequestInfo {
  readonly isResourceRequest: boolean;
  readonly path: string;
  readonly verb: string;
  readonly apiGroup?: string;
  readonly apiVersion?: string;
  readonly resource?: string;
  readonly subresource?: string;
  readonly name?: string;
}

const VERB_OF_METHOD: Record<string, string> = {
  GET: 'get',
  HEAD: 'get',
  POST: 'create',
  PUT: 'update',
  PATCH: 'patch',
  DELETE: 'delete',
};

export function requestInfo(method: string, url: string): RequestInfo {
  const q = url.indexOf('?');
  const path = q === -1 ? url : url.slice(0, q);
  const query = new URLSearchParams(q === -1 ? '' : url.slice(q + 1));
  const parts = path.split('/').filter((p) => p !== '');
  const methodVerb = VERB_OF_METHOD[method.toUpperCase()] ?? method.toLowerCase();
  if (parts[0] !== 'apis' || parts.length < 4) {
    return { isResourceRequest: false, path, verb: method.toUpperCase() === 'HEAD' ? 'get' : method.toLowerCase() };
  }
  const [, apiGroup, apiVersion, ...rest] = parts;
  let watchPrefix = false;
  if (rest[0] === 'watch') {
    watchPrefix = true;
    rest.shift();
  }
  const [resource, name, subresource] = rest;
  let verb = methodVerb;
  if (watchPrefix) verb = 'watch';
  else if (verb === 'get' && name === undefined) {
    const w = query.get('watch');
    verb = w === 'true' || w === '1' ? 'watch' : 'list';
  } else if (verb === 'delete' && name === undefined) verb = 'deletecollection';
  return {
    isResourceRequest: true,
    path,
    verb,
    apiGroup: apiGroup!,
    apiVersion: apiVersion!,
    ...(resource !== undefined ? { resource } : {}),
    ...(name !== undefined ? { name } : {}),
    ...(subresource !== undefined ? { subresource } : {}),
  };
}
