// tok-corpus: the tokenizer conformance corpus, hand-written edge cases plus
// strings generated from a fixed seed, so every run compares the same texts.
// Only characters assigned by Unicode 14 (PCRE2 10.42's tables) are used:
// a newer character is unassigned to one side and assigned to the other.

function rng(seed) {
        // mulberry32: small, and the same on every Node version
        let a = seed >>> 0;
        return () => {
                a = (a + 0x6d2b79f5) >>> 0;
                let t = a;
                t = Math.imul(t ^ (t >>> 15), t | 1);
                t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
                return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
        };
}

const words = {
        latin: ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "World",
                "naïve", "café", "résumé", "über", "Straße", "Ærøskøbing", "façade", "jalapeño",
                "Łódź", "Dvořák", "İstanbul", "ça", "señor", "Œuvre", "smörgåsbord", "don't",
                "it's", "we'll", "I'm", "they're", "O'Neil", "co-operate", "e-mail", "ÀÉÎÕÜ"],
        cyrillic: ["Привет", "мир", "Съешь", "же", "ещё", "этих", "мягких", "французских",
                   "булок", "Україна", "Ёлка", "Београд", "Жизнь", "щёлк"],
        greek: ["Καλημέρα", "κόσμε", "Ελλάδα", "ψυχή", "Ωμέγα", "αβγδ", "ΐΰ", "ἀρχή"],
        arabic: ["مرحبا", "بالعالم", "اللغة", "العربية", "كتاب", "سلام", "ٱلْحَمْدُ", "لِلَّهِ"],
        hebrew: ["שלום", "עולם", "עִבְרִית", "ספר", "ירושלים"],
        devanagari: ["नमस्ते", "दुनिया", "हिन्दी", "भाषा", "क्षत्रिय", "संस्कृतम्"],
        thai: ["สวัสดี", "ชาวโลก", "ภาษาไทย", "กรุงเทพมหานคร", "น้ำ"],
        cjk: ["你好", "世界", "中文", "汉字", "我们", "學習", "電腦", "龍", "𠀋", "𪚥", "鬱"],
        kana: ["こんにちは", "ひらがな", "カタカナ", "ありがとう", "テスト", "ラーメン", "ｶﾀｶﾅ", "ゟ", "ヿ"],
        korean: ["안녕하세요", "세계", "한국어", "감사합니다", "ㄱㄴㄷ", "뷁"],
        other: ["Բարեւ", "გამარჯობა", "ሰላም", "வணக்கம்", "ជំរាបសួរ", "မင်္ဂလာပါ", "සිංහල",
                "ꦗꦮ", "ᠮᠣᠩᠭᠣᠯ", "ᏣᎳᎩ", "𐌰𐌱𐌲"],
        emoji: ["😀", "😂", "🤣", "❤️", "👍", "🙏", "🔥", "✨", "🎉", "🚀", "🌍", "🐍", "🦀", "🍕",
                "⚽", "🏳️‍🌈", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🇺🇸", "🇯🇵", "🇩🇪", "🇧🇷", "👋🏻", "👋🏿",
                "1️⃣", "#️⃣", "☺️", "✔️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "🧑‍🚀", "🫠", "🥲", "👁️‍🗨️", "❤️‍🔥"],
        punct: ["!", "?", ".", ",", ";", ":", "...", "!!!", "?!", "—", "–", "«", "»", "“", "”",
                "‘", "’", "¿", "¡", "【", "】", "。", "，", "、", "！", "？", "（", "）", "「",
                "」", "…", "•", "§", "¶", "†", "©", "®", "™", "°", "±", "×", "÷", "€", "£",
                "¥", "$", "%", "&", "@", "#", "*", "~", "^", "|", "\\", "/", "<", ">", "=",
                "+", "-", "_", "`", "'", "\"", "(", ")", "[", "]", "{", "}", "->", "=>", "::",
                "&&", "||", "!=", "<=", ">=", "/*", "*/", "//", "<!--", "-->"],
        combining: ["e\u0301", "n\u0303", "a\u0308\u0304", "Z\u0351\u036b\u0343\u036a", "o\u0332",
                    "\u0915\u094d\u0937", "\u05e9\u05c1\u05b8", "\u0628\u064e", "\u0e01\u0e34\u0e4a",
                    "i\u0307", "\u1100\u1161\u11a8", "\u0301", "\u20dd"],
        numbers: ["0", "7", "42", "123", "1234", "12345", "123456", "1234567", "3.14159",
                  "-273.15", "1,234,567.89", "1e10", "6.022e23", "0x1F", "0b1010", "007",
                  "٠١٢٣٤٥٦٧٨٩", "०१२३४५", "１２３４", "²³", "½", "Ⅻ", "①②③", "๑๒๓", "10%",
                  "$1,000", "2024-01-15", "12:30:45", "+1 (555) 123-4567", "v1.2.3"],
};

const spaces = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "\r", " \n", "\t\t", "\u00a0",
                "\u3000", "\u2003", "\u2009", "    ", "\n    ", "\t\n", " \t ", "\u2028", "\f", "\v"];

const code = [
        "int main(void)\n{\n\tprintf(\"hello, %s\\n\", name);\n\treturn 0;\n}\n",
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);\n",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
        "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%son' ORDER BY id DESC;",
        "<!DOCTYPE html>\n<html><head><title>T</title></head><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "{\"key\": [1, 2.5, true, null], \"nested\": {\"a\": \"b\"}}",
        "#!/bin/sh\nset -eu\nfor f in *.txt; do\n  echo \"$f\" | tr a-z A-Z >> out.log 2>&1\ndone\n",
        "template <typename T>\nstd::vector<T> v{1, 2, 3};\nauto it = std::find(v.begin(), v.end(), 2);",
        "public static void main(String[] args) { System.out.println(\"x\" + args.length); }",
        "x = [i**2 for i in range(10) if i % 2 == 0]  # squares\r\nprint(x)\r\n",
        "    \tmixed\t    indentation  \t\n\t  here",
        "a[i] += b[j++] << 3; /* shift */ if (!p) return -EINVAL;",
        "$ git commit -m 'fix: handle \\r\\n' && git push origin main",
        "https://example.com/path/to/page?query=value&other=123#anchor",
        "user@example.org, first.last+tag@sub.domain.co.uk",
        "\\begin{equation} E = mc^2 \\end{equation}",
        "| col1 | col2 |\n|------|------|\n| a    | b    |",
        "- item one\n- item two\n  * nested\n1. numbered",
];

const specials = [
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
        "<|EOT|>", "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜fim▁hole｜>",
        "<｜place▁holder▁no▁42｜>", "<｜▁pad▁｜>",
];

const hand = [
        "", " ", "  ", "\n", "\r\n", "\t", "a", "A", "Hello world", " Hello world", "Hello  world",
        "Hello world ", "Hello world\n", "hello\n\nworld", "hello \n world", "a\r\nb\rc\nd",
        "   leading", "trailing   ", "\n\n\n", " \n \n ", "\t\t\tx", "x\t\t\t", "x \t\n y",
        "1", "12", "123", "1234", "12345678901234567890", "3.14", "1,000,000", "-0.5e-10",
        "abc123def", "123abc", "a1b2c3", "x=1+2*3", "٣٤٥", "۱۲۳", "１２３",
        "don't", "DON'T", "I'll", "'quoted'", "\"double\"", "(paren)", "[bracket]", "{brace}",
        "!!!", "???", "...", "?!?!", "—", "--", "---", "***", "___", "~~~", "```", "```python",
        "#include <stdio.h>", "a.b.c", "a,b,c", "a;b;c", "x->y", "x => y", "::1", "\\n", "\\\\",
        "«Bonjour»", "“quotes”", "‘single’", "¿Qué?", "¡Hola!", "【注意】", "「かぎ」",
        "日本語テキスト", "漢字とひらがなとカタカナ", "中文，标点。", "这是一个测试。", "繁體中文測試",
        "한국어 텍스트입니다.", "ภาษาไทยไม่มีช่องว่าง", "Ελληνικά κείμενα", "Русский текст.",
        "עברית מימין לשמאל", "العربية من اليمين", "हिन्दी पाठ।", "Tiếng Việt có dấu",
        "e\u0301", "\u0301", "a\u0301\u0302\u0303", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d",
        "😀", "😀😀😀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇬🇧🇫🇷", "👋🏽", "1️⃣2️⃣", "a😀b", " 😀 ",
        "<｜User｜>", "<｜User｜>Hello<｜Assistant｜>", "<｜begin▁of▁sentence｜>text",
        "<｜User｜", "｜User｜>", "<<｜User｜>>", "<｜User｜><｜User｜>", "x<|EOT|>y", "<|EOT|",
        "<｜end▁of▁sentence｜>\n", " <｜Assistant｜> ", "<｜place▁holder▁no▁799｜>",
        "<think>\nreasoning\n</think>\n\nanswer", "<tag attr=\"v\">", "</div>",
        "Pneumonoultramicroscopicsilicovolcanoconiosis", "Donaudampfschifffahrtsgesellschaftskapitän",
        "a".repeat(300), "ab".repeat(200), "abc ".repeat(100), " ".repeat(100), "\n".repeat(50),
        "\t".repeat(40), "-".repeat(120), "=".repeat(80), "0".repeat(50), "9".repeat(31),
        "😀".repeat(40), "中".repeat(100), "あ".repeat(60), "ñ".repeat(70), "\u0301".repeat(20),
        "a \u00a0b", "a\u3000b", "a\u2028b", "a\u2029b", "\u200b", "a\u200db", "a\u200cb",
        "\u00ad", "a\u00adb", "\u0000", "a\u0000b", "\u0001\u0002\u0003", "\u007f", "\u0085x",
        "\u00a0", "\ufffd", "\uffff", "\u{10FFFD}", "\u{E0001}", "\uE000", "\u{1D400}\u{1D401}",
        "ℕℤℚℝ", "∀x∈ℝ: x²≥0", "→←↑↓", "½¼¾", "Ⅻ", "™®©", "№", "℃", "µ", "Å", "ﬁ", "ǅ",
];

function pick(r, a) {
        return a[Math.floor(r() * a.length)];
}

function randomRange(r, ranges, n) {
        let s = "";
        for (let i = 0; i < n; i++) {
                const [lo, hi] = pick(r, ranges);
                s += String.fromCodePoint(lo + Math.floor(r() * (hi - lo + 1)));
        }
        return s;
}

// Blocks fully assigned long before Unicode 14 (no gaps filled since).
const blocks = [
        [0x20, 0x7e], [0xa1, 0xff], [0x100, 0x17f], [0x391, 0x3a1], [0x3b1, 0x3c9],
        [0x410, 0x44f], [0x5d0, 0x5ea], [0x621, 0x63a], [0x641, 0x64a], [0x905, 0x939],
        [0xe01, 0xe2e], [0x4e00, 0x9fa5], [0x3041, 0x3096], [0x30a1, 0x30fa], [0xac00, 0xd7a3],
        [0x2000, 0x200a], [0x2010, 0x2027], [0x1f600, 0x1f64f], [0x1f300, 0x1f3ff],
];

function sentence(r, cats) {
        const n = 1 + Math.floor(r() * 12);
        let s = "";
        for (let i = 0; i < n; i++) {
                s += pick(r, words[pick(r, cats)]);
                const x = r();
                if (x < 0.55)
                        s += " ";
                else if (x < 0.7)
                        s += pick(r, words.punct) + (r() < 0.5 ? " " : "");
                else if (x < 0.85)
                        s += pick(r, spaces);
                else if (x < 0.92)
                        s += pick(r, words.numbers);
        }
        return s;
}

export function corpus() {
        const r = rng(20240917);
        const out = [...hand, ...code, ...specials];
        const cats = Object.keys(words);

        for (const c of cats)
                for (let i = 0; i < 40; i++)
                        out.push(sentence(r, [c]));
        for (let i = 0; i < 300; i++)
                out.push(sentence(r, cats));
        for (let i = 0; i < 100; i++) {
                let s = "";
                for (let k = 0, n = 1 + Math.floor(r() * 6); k < n; k++)
                        s += pick(r, spaces) + (r() < 0.5 ? pick(r, words.latin) : "");
                out.push(s);
        }
        for (let i = 0; i < 60; i++)
                out.push(String(Math.floor(r() * 1e15)).slice(0, 1 + Math.floor(r() * 15)) +
                         pick(r, ["", " ", ".", ",", "x", "\n"]) + String(Math.floor(r() * 1e6)));
        for (let i = 0; i < 40; i++) {
                const c = pick(r, code);
                const k = Math.floor(r() * c.length);
                out.push(c.slice(k) + pick(r, spaces) + c.slice(0, k));
        }
        for (let i = 0; i < 60; i++)
                out.push(sentence(r, cats) + pick(r, specials) + sentence(r, cats) +
                         (r() < 0.5 ? pick(r, specials) : ""));
        for (let i = 0; i < 150; i++)
                out.push(randomRange(r, blocks, 1 + Math.floor(r() * 40)));
        for (let i = 0; i < 30; i++)
                out.push(pick(r, words.latin).repeat(2 + Math.floor(r() * 30)));
        for (let i = 0; i < 30; i++) {
                let s = "";
                for (let k = 0, n = 1 + Math.floor(r() * 8); k < n; k++)
                        s += pick(r, words.emoji) + (r() < 0.3 ? " " : "");
                out.push(s);
        }
        return out;
}
