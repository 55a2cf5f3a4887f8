/**
 * KMM's template substitution, reproduced exactly.
 *
 * KMM substitutes variables with github.com/a8m/envsubst's `parse` package in relaxed mode
 * (internal/utils/replaceStrings.go: `parse.New("mapping", envvars, &parse.Restrictions{})`), not
 * with Go's `os.Expand`. This is a port of that package's lexer and parser (parse/lex.go,
 * parse/parse.go, parse/node.go), so every corner behaves as in the operator:
 *
 * - `$VAR` and `${VAR}`; a name is a run of Unicode letters, digits and `_` (greedy: in
 *   `$KERNEL_X_suffix` the name is `KERNEL_X_suffix`, which is unknown);
 * - an unknown variable becomes the empty string (no error: KMM passes no restriction);
 * - `${VAR-default}` / `${VAR=default}` (VAR unset), `${VAR:-default}` / `${VAR:=default}` (VAR
 *   unset or empty), `${VAR+other}` / `${VAR:+other}` (VAR set); the default is either one
 *   `$NAME` variable or literal text (`${X:-a$B}` gives `a$B` literally);
 * - `$$` is an escaped `$`; a `$` not followed by a name, `{` or `$` stays as it is; `$_` and
 *   `${_}` are left untouched;
 * - an unclosed `${`, or a line break inside `${...}`, is an error ("closing brace expected"),
 *   which makes KMM fail the whole Module for that kernel.
 */

export type TemplateResult = { readonly ok: true; readonly value: string } | { readonly ok: false; readonly error: string };

/** The variables a template is evaluated with, as KMM's `NAME=value` list: present means set. */
export type TemplateVars = ReadonlyMap<string, string>;

// Item types, in a8m/envsubst's order (the parser compares `expType >= itemPlus`).
const itemError = 1;
const itemEOF = 2;
const itemText = 3;
const itemPlus = 4;
const itemDash = 5;
const itemEquals = 6;
const itemColonEquals = 7;
const itemColonDash = 8;
const itemColonPlus = 9;
const itemVariable = 10;
const itemLeftDelim = 11;
const itemRightDelim = 12;

interface Item {
  readonly typ: number;
  readonly val: string;
}

const EOF = -1;
const alphaNumeric = /^[\p{L}\p{Nd}_]$/u;

function isAlphaNumeric(c: number): boolean {
  return c !== EOF && alphaNumeric.test(String.fromCodePoint(c));
}

function isEndOfLine(c: number): boolean {
  return c === 0x0d || c === 0x0a;
}

/** Port of envsubst's state-machine lexer; positions are UTF-16 offsets, runes code points. */
class Lexer {
  readonly input: string;
  readonly items: Item[] = [];
  pos = 0;
  start = 0;
  width = 0;
  lastPos = 0;
  subsDepth = 0;

  constructor(input: string) {
    this.input = input;
  }

  run(): Item[] {
    let state: StateFn = lexText;
    while (state !== null) state = state(this);
    return this.items;
  }

  next(): number {
    if (this.pos >= this.input.length) {
      this.width = 0;
      return EOF;
    }
    const c = this.input.codePointAt(this.pos) as number;
    this.width = c > 0xffff ? 2 : 1;
    this.pos += this.width;
    return c;
  }

  peek(): number {
    const c = this.next();
    this.backup();
    return c;
  }

  backup(): void {
    this.pos -= this.width;
  }

  emit(typ: number): void {
    this.items.push({ typ, val: this.input.slice(this.start, this.pos) });
    this.lastPos = this.start;
    this.start = this.pos;
  }

  ignore(): void {
    this.start = this.pos;
  }

  errorf(message: string): null {
    this.items.push({ typ: itemError, val: message });
    return null;
  }
}

type StateFn = ((l: Lexer) => StateFn) | null;

function lexText(l: Lexer): StateFn {
  for (;;) {
    const c = l.next();
    if (c === EOF) break;
    if (c !== 0x24 /* $ */) continue;
    l.pos--;
    if (l.pos > l.start) l.emit(itemText);
    l.pos++;
    const r = l.peek();
    if (r === 0x24) {
      // `$$`: drop the first `$`, keep the second as text.
      l.ignore();
      l.next();
      l.emit(itemText);
    } else if (r === 0x7b /* { */) {
      l.next();
      l.subsDepth++;
      l.emit(itemLeftDelim);
      return lexSubstitution;
    } else if (isAlphaNumeric(r)) {
      return lexVariable;
    }
  }
  if (l.pos > l.start) l.emit(itemText);
  l.emit(itemEOF);
  return null;
}

function lexVariable(l: Lexer): StateFn {
  for (;;) {
    const c = l.next();
    if (!isAlphaNumeric(c)) {
      l.backup();
      break;
    }
  }
  const v = l.input.slice(l.start, l.pos);
  if (v === '_' || v === '$_') return lexText;
  l.emit(itemVariable);
  return l.subsDepth > 0 ? lexSubstitution : lexText;
}

function lexSubstitution(l: Lexer): StateFn {
  const c = l.next();
  if (c === 0x7d /* } */) {
    l.subsDepth--;
    l.emit(itemRightDelim);
    return lexText;
  }
  if (c === EOF || isEndOfLine(c)) return l.errorf('closing brace expected');
  if ((isAlphaNumeric(c) && l.input.startsWith('${', l.lastPos)) || c === 0x24) return lexVariable;
  switch (c) {
    case 0x2b /* + */:
      l.emit(itemPlus);
      break;
    case 0x2d /* - */:
      l.emit(itemDash);
      break;
    case 0x3d /* = */:
      l.emit(itemEquals);
      break;
    case 0x3a /* : */:
      switch (l.next()) {
        case 0x2d:
          l.emit(itemColonDash);
          break;
        case 0x3d:
          l.emit(itemColonEquals);
          break;
        case 0x2b:
          l.emit(itemColonPlus);
          break;
        default:
          l.emit(itemText);
      }
      break;
    default:
      l.emit(itemText);
  }
  return lexSubstitution;
}

type Node =
  | { readonly kind: 'text'; text: string }
  | { readonly kind: 'variable'; readonly name: string }
  | { readonly kind: 'substitution'; readonly expType: number; readonly variable: string; readonly fallback: Node | undefined };

function variableValue(vars: TemplateVars, name: string): string {
  return vars.get(name) ?? '';
}

function nodeString(node: Node, vars: TemplateVars): string {
  switch (node.kind) {
    case 'text':
      return node.text;
    case 'variable':
      return variableValue(vars, node.name);
    case 'substitution': {
      const fallback = node.fallback;
      if (node.expType >= itemPlus && fallback !== undefined) {
        switch (node.expType) {
          case itemColonDash:
          case itemColonEquals: {
            const v = variableValue(vars, node.variable);
            return v !== '' ? v : nodeString(fallback, vars);
          }
          case itemPlus:
          case itemColonPlus:
            return vars.has(node.variable) ? nodeString(fallback, vars) : '';
          default:
            if (!vars.has(node.variable)) return nodeString(fallback, vars);
        }
      }
      return variableValue(vars, node.variable);
    }
  }
}

/** Substitutes `vars` into `template` as KMM's `utils.ReplaceInTemplates` does. */
export function substituteTemplate(template: string, vars: TemplateVars): TemplateResult {
  const items = new Lexer(template).run();
  let i = 0;
  const next = (): Item => items[i++] ?? { typ: itemEOF, val: '' };
  const peek = (): Item => items[i] ?? { typ: itemEOF, val: '' };
  const nodes: Node[] = [];
  for (;;) {
    const t = next();
    if (t.typ === itemEOF) break;
    if (t.typ === itemError) return { ok: false, error: `failed to substitute ${JSON.stringify(template)}: ${t.val}` };
    if (t.typ === itemVariable) {
      nodes.push({ kind: 'variable', name: t.val.replace(/^\$/, '') });
      continue;
    }
    if (t.typ === itemLeftDelim && peek().typ === itemVariable) {
      // action(): the first item is the variable, then an operator and a default.
      const variable = next().val;
      let expType = 0;
      let fallback: Node | undefined;
      for (;;) {
        const a = next();
        if (a.typ === itemRightDelim) break;
        if (a.typ === itemError) return { ok: false, error: `failed to substitute ${JSON.stringify(template)}: ${a.val}` };
        if (a.typ === itemEOF) break; // unreachable: the lexer reports an error first
        if (a.typ === itemVariable) {
          fallback = { kind: 'variable', name: a.val.replace(/^\$/, '') };
        } else if (a.typ === itemText) {
          const text: Node = { kind: 'text', text: a.val };
          for (;;) {
            const p = peek().typ;
            if (p === itemRightDelim || p === itemError || p === itemEOF) break;
            text.text += next().val;
          }
          fallback = text;
        } else {
          expType = a.typ;
        }
      }
      nodes.push({ kind: 'substitution', expType, variable, fallback });
      continue;
    }
    nodes.push({ kind: 'text', text: t.val });
  }
  return { ok: true, value: nodes.map((n) => nodeString(n, vars)).join('') };
}
