/**
 * The free variables of a function's source: the names it reads that it does not declare
 * itself (its parameters, variables, functions, classes, catch bindings, at any depth).
 * Only a function's source travels, so each of these is a variable of the sender's that
 * the executor will not have, or a global of the executor's that may not be the one meant.
 *
 * A tokenizer (regular expressions told from division by the token before, templates with
 * their placeholders, automatic semicolons where a line break ends a statement) and a
 * recursive-descent walk over statements, expressions, patterns, functions, arrows,
 * classes and object literals, with a scope per function and block. It checks no grammar
 * beyond what it needs: the source has compiled already. When it meets what it cannot
 * follow it throws ScopeError, and the caller skips the check rather than refuse a
 * function that runs.
 *
 * @module
 */

/** The source is beyond what this walk follows (never a reason to refuse a function). */
export class ScopeError extends Error {
  /** `message` says where the walk lost its way. */
  constructor(message: string) {
    super(message);
    this.name = "ScopeError";
  }
}

type TokenType = "name" | "num" | "str" | "regex" | "punct" | "priv" | "tpl";

interface Token {
  type: TokenType;
  value: string;
  /** A line break between this token and the one before. */
  nl: boolean;
}

/** Punctuators, longest first. `}$` (a template placeholder's end) is made by the tokenizer. */
const PUNCTUATORS = [
  ">>>=",
  "...",
  "===",
  "!==",
  "**=",
  "<<=",
  ">>=",
  ">>>",
  "&&=",
  "||=",
  "??=",
  "=>",
  "==",
  "!=",
  "<=",
  ">=",
  "&&",
  "||",
  "??",
  "?.",
  "++",
  "--",
  "+=",
  "-=",
  "*=",
  "/=",
  "%=",
  "&=",
  "|=",
  "^=",
  "**",
  "<<",
  ">>",
  "${",
];
const SINGLE = "{}()[];,<>+-*/%&|^!~?:=.@";
/** The punctuators of two characters or more by their first, longest first. */
const PUNCTUATORS_BY_FIRST = new Map<string, string[]>();
for (const p of PUNCTUATORS) {
  const list = PUNCTUATORS_BY_FIRST.get(p[0]) ?? [];
  list.push(p);
  PUNCTUATORS_BY_FIRST.set(p[0], list);
}
/** After these names a `/` starts a regular expression, not a division. */
const BEFORE_EXPRESSION = new Set([
  "return",
  "typeof",
  "instanceof",
  "in",
  "of",
  "new",
  "delete",
  "void",
  "throw",
  "case",
  "do",
  "else",
  "yield",
  "await",
  "extends",
]);
/** Names that are never variables. */
const RESERVED = new Set([
  "break",
  "case",
  "catch",
  "class",
  "const",
  "continue",
  "debugger",
  "default",
  "delete",
  "do",
  "else",
  "enum",
  "export",
  "extends",
  "false",
  "finally",
  "for",
  "function",
  "if",
  "import",
  "in",
  "instanceof",
  "new",
  "null",
  "return",
  "super",
  "switch",
  "this",
  "throw",
  "true",
  "try",
  "typeof",
  "var",
  "void",
  "while",
  "with",
  "yield",
  "await",
  "let",
  "static",
]);
/** Statement keywords: an expression that meets one has ended (a missing semicolon). */
const STATEMENT_KEYWORDS = new Set([
  "var",
  "let",
  "const",
  "if",
  "for",
  "while",
  "do",
  "return",
  "throw",
  "try",
  "switch",
  "break",
  "continue",
  "debugger",
  "with",
  "case",
  "default",
  "else",
  "catch",
  "finally",
]);

const ID_START_RE = /[\p{ID_Start}$_\\]/u;
const ID_PART_RE = /[\p{ID_Continue}$\u200c\u200d\\]/u;
/** ASCII letters, digits, `$`, `_`: the common case without a regular expression. */
function asciiPart(code: number): boolean {
  return (code >= 97 && code <= 122) || (code >= 65 && code <= 90) || (code >= 48 && code <= 57) ||
    code === 36 ||
    code === 95;
}
const ID_START = {
  test(c: string): boolean {
    const code = c.charCodeAt(0);
    if (code < 128) return asciiPart(code) && !(code >= 48 && code <= 57) || code === 92;
    return ID_START_RE.test(c);
  },
};
const ID_PART = {
  test(c: string): boolean {
    const code = c.charCodeAt(0);
    return code < 128 ? asciiPart(code) || code === 92 : ID_PART_RE.test(c);
  },
};

function tokenize(src: string): Token[] {
  const out: Token[] = [];
  let i = 0;
  let nl = false;
  /** For each open `{` or `${`: whether it is a template's placeholder. */
  const braces: boolean[] = [];
  /** Whether a `/` here would start a regular expression. */
  const regexAllowed = (): boolean => {
    const last = out.at(-1);
    if (last === undefined) return true;
    switch (last.type) {
      case "num":
      case "str":
      case "regex":
      case "tpl":
      case "priv":
        return false;
      case "name":
        return BEFORE_EXPRESSION.has(last.value);
      case "punct":
        return ![")", "]", "++", "--", "}$"].includes(last.value);
    }
  };
  const push = (type: TokenType, value: string) => {
    out.push({ type, value, nl });
    nl = false;
  };
  /** Scans a template's text from `i` (just past a backtick or a placeholder's `}`). */
  const templateText = (): void => {
    for (;;) {
      if (i >= src.length) throw new ScopeError("unterminated template literal");
      const c = src[i];
      if (c === "\\") i += 2;
      else if (c === "`") {
        i++;
        return;
      } else if (c === "$" && src[i + 1] === "{") {
        i += 2;
        push("punct", "${");
        braces.push(true);
        return;
      } else i++;
    }
  };
  while (i < src.length) {
    const c = src[i];
    if (c === "\n" || c === "\r" || c === "\u2028" || c === "\u2029") {
      nl = true;
      i++;
      continue;
    }
    if (
      c === " " || c === "\t" || (c.charCodeAt(0) > 127 || c === "\v" || c === "\f") && /\s|\ufeff/.test(c)
    ) {
      i++;
      continue;
    }
    if (c === "/" && src[i + 1] === "/") {
      while (i < src.length && !/[\n\r\u2028\u2029]/.test(src[i])) i++;
      continue;
    }
    if (c === "/" && src[i + 1] === "*") {
      const end = src.indexOf("*/", i + 2);
      if (end < 0) throw new ScopeError("unterminated comment");
      if (/[\n\r\u2028\u2029]/.test(src.slice(i, end))) nl = true;
      i = end + 2;
      continue;
    }
    if (c === "`") {
      i++;
      push("tpl", "`");
      templateText();
      continue;
    }
    if (c === "}" && braces.at(-1) === true) {
      braces.pop();
      i++;
      push("punct", "}$");
      templateText();
      continue;
    }
    if (c === '"' || c === "'") {
      let j = i + 1;
      while (j < src.length && src[j] !== c) j += src[j] === "\\" ? 2 : 1;
      if (j >= src.length) throw new ScopeError("unterminated string");
      push("str", src.slice(i, j + 1));
      i = j + 1;
      continue;
    }
    if (c === "#" && ID_START.test(src[i + 1] ?? "")) {
      let j = i + 1;
      while (j < src.length && ID_PART.test(src[j])) j++;
      push("priv", src.slice(i, j));
      i = j;
      continue;
    }
    if (ID_START.test(c)) {
      let j = i;
      while (j < src.length && (ID_PART.test(src[j]) || (src[j] === "\\" && src[j + 1] === "u"))) {
        j += src[j] === "\\" ? (src[j + 2] === "{" ? src.indexOf("}", j) + 1 - j : 6) : 1;
      }
      const raw = src.slice(i, j);
      const name = raw.includes("\\")
        ? raw.replace(
          /\\u\{([\da-fA-F]+)\}|\\u([\da-fA-F]{4})/g,
          (_, a, b) => String.fromCodePoint(parseInt(a ?? b, 16)),
        )
        : raw;
      push("name", name);
      i = j;
      continue;
    }
    if (/\d/.test(c) || (c === "." && /\d/.test(src[i + 1] ?? ""))) {
      const m = /^(?:0[xXoObB][\da-fA-F_]+n?|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d[\d_]*)?n?)/.exec(
        src.slice(i, i + 400),
      );
      if (m === null) throw new ScopeError(`a number at ${i}`);
      push("num", m[0]);
      i += m[0].length;
      continue;
    }
    if (c === "/" && regexAllowed()) {
      let j = i + 1;
      let inClass = false;
      for (;;) {
        if (j >= src.length || /[\n\r]/.test(src[j])) throw new ScopeError("unterminated regular expression");
        const d = src[j];
        if (d === "\\") j += 2;
        else if (d === "[") inClass = true, j++;
        else if (d === "]") inClass = false, j++;
        else if (d === "/" && !inClass) break;
        else j++;
      }
      j++;
      while (j < src.length && ID_PART.test(src[j])) j++;
      push("regex", src.slice(i, j));
      i = j;
      continue;
    }
    const p = PUNCTUATORS_BY_FIRST.get(c)?.find((p) => src.startsWith(p, i));
    if (p !== undefined && !(p === "?." && /\d/.test(src[i + 2] ?? ""))) {
      if (p === "${") throw new ScopeError("a placeholder outside a template");
      push("punct", p);
      i += p.length;
      continue;
    }
    if (SINGLE.includes(c)) {
      if (c === "{") braces.push(false);
      if (c === "}") braces.pop();
      push("punct", c);
      i++;
      continue;
    }
    throw new ScopeError(`an unexpected character ${JSON.stringify(c)} at ${i}`);
  }
  return out;
}

class Scope {
  readonly names = new Set<string>();
  readonly refs: string[] = [];
  constructor(readonly parent: Scope | null, readonly isFunction: boolean) {}
  /** The nearest function scope: where `var` declares. */
  get functionScope(): Scope {
    return this.isFunction || this.parent === null ? this : this.parent.functionScope;
  }
}

interface ExpressionOptions {
  /** Whether a top-level `,` continues the expression (a comma expression) or ends it. */
  comma: boolean;
  /** A class's `extends` expression: a `{` ends it (the class body). */
  classHeritage?: boolean;
}

class Walk {
  readonly #t: Token[];
  #i = 0;
  #scope: Scope;
  readonly scopes: Scope[] = [];

  /** For each opening bracket, the index of the one that closes it. */
  readonly #match = new Map<number, number>();

  constructor(tokens: Token[]) {
    this.#t = tokens;
    this.#scope = this.#newScope(null, true);
    const open: number[] = [];
    tokens.forEach((t, j) => {
      if (t.type !== "punct") return;
      if (t.value === "(" || t.value === "[" || t.value === "{" || t.value === "${") open.push(j);
      else if (t.value === ")" || t.value === "]" || t.value === "}" || t.value === "}$") {
        const at = open.pop();
        if (at === undefined) throw new ScopeError(`an unopened ${t.value}`);
        this.#match.set(at, j);
      }
    });
    if (open.length > 0) throw new ScopeError("an unclosed bracket");
  }

  /** The whole source: one expression (a function). */
  run(): void {
    this.#expression({ comma: true });
    if (this.#i < this.#t.length) throw new ScopeError(`stopped at ${this.#describe()}`);
  }

  // ---- tokens ----

  #peek(ahead = 0): Token | undefined {
    return this.#t[this.#i + ahead];
  }

  #is(value: string, ahead = 0): boolean {
    const t = this.#peek(ahead);
    return t !== undefined && (t.type === "punct" || t.type === "name") && t.value === value;
  }

  #eat(value: string): boolean {
    if (!this.#is(value)) return false;
    this.#i++;
    return true;
  }

  #expect(value: string): void {
    if (!this.#eat(value)) throw new ScopeError(`expected ${value} at ${this.#describe()}`);
  }

  #describe(): string {
    const t = this.#peek();
    return t === undefined ? "the end" : `token ${this.#i} (${JSON.stringify(t.value)})`;
  }

  /** The index of the bracket that closes the one at `at`. */
  #closing(at: number): number {
    const j = this.#match.get(at);
    if (j === undefined) throw new ScopeError("an unclosed bracket");
    return j;
  }

  // ---- scopes ----

  #newScope(parent: Scope | null, isFunction: boolean): Scope {
    const scope = new Scope(parent, isFunction);
    this.scopes.push(scope);
    return scope;
  }

  #within<T>(scope: Scope, body: () => T): T {
    const outer = this.#scope;
    this.#scope = scope;
    try {
      return body();
    } finally {
      this.#scope = outer;
    }
  }

  #reference(name: string): void {
    this.#scope.refs.push(name);
  }

  // ---- statements ----

  /** Statements until the `}` that closes the current block (not eaten). */
  #statements(): void {
    while (this.#peek() !== undefined && !this.#is("}")) this.#statement();
  }

  #block(scope = this.#newScope(this.#scope, false)): void {
    this.#expect("{");
    this.#within(scope, () => this.#statements());
    this.#expect("}");
  }

  #statement(): void {
    const start = this.#i;
    const t = this.#peek()!;
    if (t.type === "punct") {
      if (t.value === "{") return this.#block();
      if (t.value === ";") {
        this.#i++;
        return;
      }
    }
    if (t.type === "name") {
      const next = this.#peek(1);
      switch (t.value) {
        case "var":
        case "const":
          this.#i++;
          this.#declarations(t.value);
          return this.#endStatement();
        case "let":
          if (next && (next.type === "name" || next.value === "[" || next.value === "{")) {
            this.#i++;
            this.#declarations("let");
            return this.#endStatement();
          }
          break;
        case "function":
          return this.#function(true);
        case "async":
          if (this.#is("function", 1) && !next!.nl) {
            this.#i++;
            return this.#function(true);
          }
          break;
        case "class":
          return this.#class(true);
        case "if":
          this.#i++;
          this.#parenthesized();
          this.#statement();
          if (this.#eat("else")) this.#statement();
          return;
        case "while":
        case "with":
          this.#i++;
          this.#parenthesized();
          return this.#statement();
        case "do":
          this.#i++;
          this.#statement();
          this.#expect("while");
          this.#parenthesized();
          this.#eat(";");
          return;
        case "for":
          return this.#for();
        case "try":
          this.#i++;
          this.#block();
          if (this.#eat("catch")) {
            const scope = this.#newScope(this.#scope, false);
            if (this.#eat("(")) {
              this.#within(scope, () => this.#pattern((name) => scope.names.add(name)));
              this.#expect(")");
            }
            this.#block(scope);
          }
          if (this.#eat("finally")) this.#block();
          return;
        case "switch":
          return this.#switch();
        case "return":
        case "throw":
          this.#i++;
          if (!this.#endsHere()) this.#expression({ comma: true });
          return this.#endStatement();
        case "break":
        case "continue":
          this.#i++;
          if (this.#peek()?.type === "name" && !this.#peek()!.nl && !RESERVED.has(this.#peek()!.value)) {
            this.#i++;
          }
          return this.#endStatement();
        case "debugger":
          this.#i++;
          return this.#endStatement();
        case "import":
        case "export":
          throw new ScopeError("an import or export statement");
        default:
          // A label: its name is no variable.
          if (!RESERVED.has(t.value) && next?.type === "punct" && next.value === ":") {
            this.#i += 2;
            return this.#statement();
          }
      }
    }
    this.#expression({ comma: true });
    this.#endStatement();
    if (this.#i === start) throw new ScopeError(`no progress at ${this.#describe()}`);
  }

  /** Whether the statement ends here: `;`, `}`, the end, or a line break before the next token. */
  #endsHere(): boolean {
    const t = this.#peek();
    return t === undefined || t.nl || (t.type === "punct" && (t.value === ";" || t.value === "}"));
  }

  #endStatement(): void {
    this.#eat(";");
  }

  #parenthesized(): void {
    this.#expect("(");
    this.#expression({ comma: true });
    this.#expect(")");
  }

  /** `var|let|const` already eaten: bindings with initializers, to the end of the list. */
  #declarations(kind: string): void {
    const scope = kind === "var" ? this.#scope.functionScope : this.#scope;
    for (;;) {
      this.#pattern((name) => scope.names.add(name));
      if (this.#eat("=")) this.#expression({ comma: false });
      if (!this.#eat(",")) return;
    }
  }

  #for(): void {
    this.#expect("for");
    this.#eat("await");
    this.#expect("(");
    const scope = this.#newScope(this.#scope, false);
    this.#within(scope, () => {
      const t = this.#peek();
      const declares = t?.type === "name" &&
        (t.value === "var" || t.value === "const" ||
          (t.value === "let" && (this.#peek(1)?.type === "name" || this.#is("[", 1) || this.#is("{", 1))));
      if (declares) {
        this.#i++;
        const target = t!.value === "var" ? scope.functionScope : scope;
        for (;;) {
          this.#pattern((name) => target.names.add(name));
          if (this.#eat("=")) this.#expression({ comma: false });
          if (!this.#eat(",")) break;
        }
        if (this.#eat("of") || this.#eat("in")) this.#expression({ comma: true });
      } else if (!this.#is(";")) {
        this.#expression({ comma: true });
      }
      if (this.#eat(";")) {
        if (!this.#is(";")) this.#expression({ comma: true });
        this.#expect(";");
        if (!this.#is(")")) this.#expression({ comma: true });
      }
      this.#expect(")");
      this.#statement();
    });
  }

  #switch(): void {
    this.#expect("switch");
    this.#parenthesized();
    this.#expect("{");
    const scope = this.#newScope(this.#scope, false);
    this.#within(scope, () => {
      while (!this.#is("}")) {
        if (this.#eat("case")) {
          this.#expression({ comma: true });
          this.#expect(":");
        } else if (this.#eat("default")) {
          this.#expect(":");
        } else this.#statement();
      }
    });
    this.#expect("}");
  }

  // ---- patterns ----

  /** A binding: a name, or an object or array pattern with defaults; each name bound goes to `bind`. */
  #pattern(bind: (name: string) => void): void {
    const t = this.#peek();
    if (t === undefined) throw new ScopeError("a pattern at the end");
    if (t.type === "name" && !RESERVED.has(t.value) || t.type === "name" && t.value === "let") {
      this.#i++;
      bind(t.value);
      return;
    }
    if (this.#eat("[")) {
      while (!this.#eat("]")) {
        if (this.#eat(",")) continue;
        this.#eat("...");
        this.#pattern(bind);
        if (this.#eat("=")) this.#expression({ comma: false });
        if (!this.#is("]")) this.#expect(",");
      }
      return;
    }
    if (this.#eat("{")) {
      while (!this.#eat("}")) {
        if (this.#eat("...")) {
          this.#pattern(bind);
        } else {
          const key = this.#peek()!;
          if (this.#is("[")) {
            this.#i++;
            this.#expression({ comma: true });
            this.#expect("]");
          } else this.#i++;
          if (this.#eat(":")) this.#pattern(bind);
          else if (key.type === "name") bind(key.value);
          else throw new ScopeError(`a pattern key ${key.value} without a binding`);
          if (this.#eat("=")) this.#expression({ comma: false });
        }
        if (!this.#is("}")) this.#expect(",");
      }
      return;
    }
    throw new ScopeError(`a pattern at ${this.#describe()}`);
  }

  // ---- functions and classes ----

  /** At `function` (after any `async`): a declaration binds its name here, an expression in itself. */
  #function(declaration: boolean): void {
    this.#expect("function");
    this.#eat("*");
    const scope = this.#newScope(this.#scope, true);
    const name = this.#peek();
    if (name?.type === "name" && !this.#is("(")) {
      this.#i++;
      if (declaration) {
        this.#scope.names.add(name.value);
        this.#scope.functionScope.names.add(name.value);
      } else scope.names.add(name.value);
    }
    this.#functionRest(scope);
  }

  /** Parameters and body of a function (not an arrow), in `scope`. */
  #functionRest(scope: Scope): void {
    scope.names.add("arguments");
    this.#within(scope, () => {
      this.#params();
      this.#expect("{");
      this.#statements();
      this.#expect("}");
    });
  }

  /** `( patterns )`, binding into the current scope. */
  #params(): void {
    this.#expect("(");
    const scope = this.#scope;
    while (!this.#eat(")")) {
      this.#eat("...");
      this.#pattern((name) => scope.names.add(name));
      if (this.#eat("=")) this.#expression({ comma: false });
      if (!this.#is(")")) this.#expect(",");
    }
  }

  /** At an arrow's parameters: a name or `( ... )`, then `=>` and its body. */
  #arrow(): void {
    const scope = this.#newScope(this.#scope, true);
    this.#within(scope, () => {
      if (this.#is("(")) this.#params();
      else {
        scope.names.add(this.#peek()!.value);
        this.#i++;
      }
      this.#expect("=>");
      if (this.#is("{")) {
        this.#i++;
        this.#statements();
        this.#expect("}");
      } else this.#expression({ comma: false });
    });
  }

  /** At `class`: a declaration binds its name here, an expression in itself. */
  #class(declaration: boolean): void {
    this.#expect("class");
    const scope = this.#newScope(this.#scope, false);
    const name = this.#peek();
    if (name?.type === "name" && name.value !== "extends" && !this.#is("{")) {
      this.#i++;
      (declaration ? this.#scope : scope).names.add(name.value);
    }
    this.#within(scope, () => {
      if (this.#eat("extends")) this.#expression({ comma: false, classHeritage: true });
      this.#expect("{");
      while (!this.#eat("}")) {
        if (this.#eat(";")) continue;
        if (this.#is("static") && this.#is("{", 1)) {
          this.#i++;
          this.#block(this.#newScope(this.#scope, true));
          continue;
        }
        this.#member(true);
      }
    });
  }

  /**
   * One member of a class body or object literal: modifiers, a key (a name is no variable,
   * save an object's shorthand `{ a }`), then a method, a value or a field initializer.
   */
  #member(inClass: boolean): void {
    const modifiers = inClass ? ["static", "get", "set", "async", "accessor"] : ["get", "set", "async"];
    for (;;) {
      const t = this.#peek();
      const next = this.#peek(1);
      const isModifier = t?.type === "name" && modifiers.includes(t.value) && next !== undefined &&
        !(next.type === "punct" && ["(", "=", ";", "}", ",", ":"].includes(next.value)) &&
        !(inClass && next.nl);
      if (isModifier) this.#i++;
      else if (this.#is("*")) this.#i++;
      else break;
    }
    const key = this.#peek();
    if (key === undefined) throw new ScopeError("a member at the end");
    if (this.#is("[")) {
      this.#i++;
      this.#expression({ comma: true });
      this.#expect("]");
    } else if (key.type === "name" || key.type === "str" || key.type === "num" || key.type === "priv") {
      this.#i++;
    } else throw new ScopeError(`a member key at ${this.#describe()}`);
    if (this.#is("(")) {
      this.#functionRest(this.#newScope(this.#scope, true));
      return;
    }
    if (inClass) {
      if (this.#eat("=")) {
        this.#within(this.#newScope(this.#scope, true), () => this.#expression({ comma: false }));
      }
      this.#eat(";");
      return;
    }
    if (this.#eat(":")) {
      this.#expression({ comma: false });
      return;
    }
    // A shorthand `{ a }` (or `{ a = 1 }` in a pattern written as an assignment) reads `a`.
    if (key.type !== "name") throw new ScopeError(`a shorthand ${key.value}`);
    this.#reference(key.value);
    if (this.#eat("=")) this.#expression({ comma: false });
  }

  #object(): void {
    this.#expect("{");
    while (!this.#eat("}")) {
      if (this.#eat("...")) this.#expression({ comma: false });
      else this.#member(false);
      if (!this.#is("}")) this.#expect(",");
    }
  }

  // ---- expressions ----

  /** Whether the token at `at` is `(` whose match is followed by `=>`. */
  #arrowAt(at: number): boolean {
    const t = this.#t[at];
    if (t?.type !== "punct" || t.value !== "(") return false;
    const after = this.#t[this.#closing(at) + 1];
    return after?.type === "punct" && after.value === "=>" && !after.nl;
  }

  /**
   * An expression, to the first token that cannot continue it at this depth: a closing
   * bracket, `;`, a `,` (unless `comma`), a `:` that no `?` of its own waits for, a
   * statement keyword, or a line break where a statement ends.
   */
  #expression(options: ExpressionOptions): void {
    let questions = 0;
    let previous: Token | undefined;
    for (;;) {
      const t = this.#peek();
      if (t === undefined) return;
      if (t.type === "punct") {
        const v = t.value;
        if (v === ")" || v === "]" || v === "}" || v === "}$" || v === ";") return;
        if (v === "," && !options.comma) return;
        if (v === ":") {
          if (questions === 0) return;
          questions--;
        }
        if (v === "?") questions++;
        if (v === "{" && options.classHeritage) return;
      }
      const afterDot = previous?.type === "punct" && (previous.value === "." || previous.value === "?.");
      if (previous !== undefined && t.nl && endsExpression(previous) && startsStatement(t)) return;
      if (t.type === "name" && STATEMENT_KEYWORDS.has(t.value) && !afterDot) return;
      const at = this.#i;
      this.#operand(previous);
      if (this.#i === at) throw new ScopeError(`no progress at ${this.#describe()}`);
      previous = this.#t[this.#i - 1];
    }
  }

  /** One token, or one bracketed construct, of an expression. */
  #operand(previous: Token | undefined): void {
    const t = this.#peek()!;
    const afterDot = previous?.type === "punct" && (previous.value === "." || previous.value === "?.");
    if (t.type === "punct") {
      switch (t.value) {
        case "(":
          if (this.#arrowAt(this.#i)) return this.#arrow();
          this.#i++;
          if (!this.#is(")")) this.#expression({ comma: true });
          this.#expect(")");
          return;
        case "[":
          this.#i++;
          if (!this.#is("]")) this.#expression({ comma: true });
          this.#expect("]");
          return;
        case "{":
          return this.#object();
        default:
          this.#i++;
          return;
      }
    }
    if (t.type === "tpl") {
      this.#i++;
      while (this.#eat("${")) {
        this.#expression({ comma: true });
        this.#expect("}$");
      }
      return;
    }
    if (t.type !== "name") {
      this.#i++;
      return;
    }
    if (afterDot) {
      this.#i++; // a property name
      return;
    }
    const next = this.#peek(1);
    switch (t.value) {
      case "function":
        return this.#function(false);
      case "class":
        return this.#class(false);
      case "async":
        if (next && !next.nl) {
          if (next.type === "name" && next.value === "function") {
            this.#i++;
            return this.#function(false);
          }
          if (next.type === "name" && this.#is("=>", 2)) {
            this.#i++;
            return this.#arrow();
          }
          if (this.#arrowAt(this.#i + 1)) {
            this.#i++;
            return this.#arrow();
          }
        }
        break;
      case "new":
        this.#i++;
        if (this.#eat(".")) this.#i++; // new.target
        return;
    }
    if (next?.type === "punct" && next.value === "=>" && !next.nl && !RESERVED.has(t.value)) {
      return this.#arrow();
    }
    this.#i++;
    if (RESERVED.has(t.value) || t.value === "of") return;
    this.#reference(t.value);
  }
}

/** Whether `t` can be the last token of an expression. */
function endsExpression(t: Token): boolean {
  if (t.type === "punct") return [")", "]", "}", "++", "--"].includes(t.value);
  if (t.type === "name") return !BEFORE_EXPRESSION.has(t.value) || t.value === "this";
  return true;
}

/** Whether `t`, after a line break, starts a new statement rather than continue the expression. */
function startsStatement(t: Token): boolean {
  if (t.type === "punct") return ["{", "!", "~", "++", "--"].includes(t.value);
  if (t.type === "name") return !["in", "instanceof", "of"].includes(t.value);
  return t.type !== "tpl";
}

/**
 * The names `source` (a function expression) reads without declaring them: its free
 * variables. Throws ScopeError when the source is beyond what this walk follows.
 */
export function freeVariables(source: string): Set<string> {
  const walk = new Walk(tokenize(source));
  walk.run();
  const free = new Set<string>();
  for (const scope of walk.scopes) {
    for (const name of scope.refs) {
      let s: Scope | null = scope;
      while (s !== null && !s.names.has(name)) s = s.parent;
      if (s === null) free.add(name);
    }
  }
  return free;
}
