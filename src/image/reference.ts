/**
 * Container image references, parsed by the grammar of the OCI distribution `reference` package
 * (github.com/distribution/reference), with Docker's normalisation (docker.io and library/).
 *
 * Written by hand because no maintained npm package implements the grammar with normalisation;
 * see docs/adr/0004-image-reference-parser.md. The original operator split on the first `:` and so
 * took `registry:5000/image` for a tag; here the domain is recognised first.
 */

const alnum = '[a-z0-9]+';
const separator = '(?:[._]|__|[-]+)';
const pathComponent = `${alnum}(?:${separator}${alnum})*`;
const domainComponent = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const domainName = `${domainComponent}(?:\\.${domainComponent})*`;
const ipv6 = '\\[(?:[a-fA-F0-9:]+)\\]';
const host = `(?:${domainName}|${ipv6})`;
const domain = `${host}(?::[0-9]+)?`;
const tag = '[\\w][\\w.-]{0,127}';
const digest = '[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}';

const DOMAIN_RE = new RegExp(`^${domain}$`);
const PATH_RE = new RegExp(`^${pathComponent}(?:/${pathComponent})*$`);
const TAG_RE = new RegExp(`^${tag}$`);
const DIGEST_RE = new RegExp(`^${digest}$`);

const NAME_TOTAL_LENGTH_MAX = 255;
export const DEFAULT_DOMAIN = 'docker.io';
const LEGACY_DEFAULT_DOMAIN = 'index.docker.io';
const OFFICIAL_REPO_PREFIX = 'library/';

/** A parsed, normalised image reference. */
export interface ImageReference {
  /** Registry host, with port when given, e.g. `registry.example.com:5000`; `docker.io` by default. */
  readonly domain: string;
  /** Repository path inside the registry, e.g. `library/busybox`. */
  readonly path: string;
  readonly tag?: string;
  readonly digest?: string;
  /** The reference in full normalised form, e.g. `docker.io/library/busybox:latest`. */
  readonly normalized: string;
}

export class ImageReferenceError extends Error {
  readonly reference: string;
  constructor(reference: string, reason: string) {
    super(`invalid image reference "${reference}": ${reason}`);
    this.name = 'ImageReferenceError';
    this.reference = reference;
  }
}

function splitDomain(name: string): { domain: string; path: string } {
  const slash = name.indexOf('/');
  const first = slash === -1 ? '' : name.slice(0, slash);
  const isDomain =
    slash !== -1 && (first.includes('.') || first.includes(':') || first === 'localhost' || first !== first.toLowerCase());
  let domainPart = isDomain ? first : DEFAULT_DOMAIN;
  let path = isDomain ? name.slice(slash + 1) : name;
  if (domainPart === LEGACY_DEFAULT_DOMAIN) domainPart = DEFAULT_DOMAIN;
  if (domainPart === DEFAULT_DOMAIN && !path.includes('/')) path = OFFICIAL_REPO_PREFIX + path;
  return { domain: domainPart, path };
}

/**
 * Parses and normalises an image reference. A reference without tag or digest gets no tag here;
 * callers that pull use {@link withDefaultTag}.
 */
export function parseImageReference(reference: string): ImageReference {
  if (reference.length === 0) throw new ImageReferenceError(reference, 'it is empty');
  if (/\s/.test(reference)) throw new ImageReferenceError(reference, 'it contains white space');

  let rest = reference;
  let digestPart: string | undefined;
  const at = rest.indexOf('@');
  if (at !== -1) {
    digestPart = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_RE.test(digestPart)) throw new ImageReferenceError(reference, `"${digestPart}" is not a valid digest`);
    if (digestPart.startsWith('sha256:') && !/^sha256:[0-9a-f]{64}$/.test(digestPart)) {
      throw new ImageReferenceError(reference, 'a sha256 digest has exactly 64 lower-case hex characters');
    }
  }

  let tagPart: string | undefined;
  const lastColon = rest.lastIndexOf(':');
  if (lastColon > rest.lastIndexOf('/')) {
    tagPart = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!TAG_RE.test(tagPart)) throw new ImageReferenceError(reference, `"${tagPart}" is not a valid tag`);
  }

  const { domain: domainPart, path } = splitDomain(rest);
  if (!DOMAIN_RE.test(domainPart)) throw new ImageReferenceError(reference, `"${domainPart}" is not a valid registry host`);
  if (!PATH_RE.test(path)) {
    throw new ImageReferenceError(
      reference,
      `"${path}" is not a valid repository name (lower-case letters, digits and separators . _ __ - between path components)`,
    );
  }
  if (domainPart.length + 1 + path.length > NAME_TOTAL_LENGTH_MAX) {
    throw new ImageReferenceError(reference, `the repository name is longer than ${NAME_TOTAL_LENGTH_MAX} characters`);
  }

  const name = `${domainPart}/${path}`;
  const normalized = name + (tagPart !== undefined ? `:${tagPart}` : '') + (digestPart !== undefined ? `@${digestPart}` : '');
  return {
    domain: domainPart,
    path,
    ...(tagPart !== undefined ? { tag: tagPart } : {}),
    ...(digestPart !== undefined ? { digest: digestPart } : {}),
    normalized,
  };
}

/** True when `reference` parses; for schema formats. */
export function isImageReference(reference: string): boolean {
  try {
    parseImageReference(reference);
    return true;
  } catch {
    return false;
  }
}

/** The reference with `latest` as tag when it has neither tag nor digest, as a pull does. */
export function withDefaultTag(ref: ImageReference): ImageReference {
  if (ref.tag !== undefined || ref.digest !== undefined) return ref;
  return { ...ref, tag: 'latest', normalized: `${ref.normalized}:latest` };
}
