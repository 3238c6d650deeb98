//! The quickstart's two text tasks, generated deterministically from a shipped word list.
//!
//! Task A (what the shipped base model learned by full fine-tuning) is three word games:
//!
//! ```text
//! Repeat the word: walrus -> walrus
//! Reverse the word: walrus -> surlaw
//! Shout the word: walrus -> WALRUS
//! ```
//!
//! Task B (what the LoRA adapter learns) is a new instruction the base has never seen, asking
//! for one of its skills in other words. Given it, the base answers with garbage
//! (`Say it again: walrus -> WaAROS`):
//!
//! ```text
//! Say it again: walrus -> walrus
//! ```
//!
//! Every answer ends with a newline, which is where generation stops. Words are split once into
//! training and held-out sets, so held-out accuracy measures generalisation, not recall.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The shipped word list (see `assets/quickstart/WORDS-LICENSE.txt`).
pub const WORDS: &str = include_str!("../../../assets/quickstart/words.txt");

/// One prompt with its expected completion.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    /// The instruction and the word, ending with `" ->"`.
    pub prompt: String,
    /// `" <answer>\n"`.
    pub completion: String,
}

/// How many words are held out for evaluation (never trained on in task B).
pub const HELD_OUT: usize = 300;

/// A word game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Game {
    /// `Repeat the word: w -> w`.
    Repeat,
    /// `Reverse the word: w -> reversed`.
    Reverse,
    /// `Shout the word: w -> UPPER`.
    Shout,
    /// Task B: `Say it again: w -> w`.
    SayAgain,
}

impl Game {
    /// The example for `word`.
    pub fn example(self, word: &str) -> Example {
        let rev: String = word.chars().rev().collect();
        let (instr, answer) = match self {
            Game::Repeat => ("Repeat the word", word.to_string()),
            Game::Reverse => ("Reverse the word", rev),
            Game::Shout => ("Shout the word", word.to_uppercase()),
            Game::SayAgain => ("Say it again", word.to_string()),
        };
        Example {
            prompt: format!("{instr}: {word} ->"),
            completion: format!(" {answer}\n"),
        }
    }
}

/// The word list split into (training, held-out) words, shuffled by `seed`.
pub fn split_words(seed: u64, held_out: usize) -> (Vec<String>, Vec<String>) {
    let mut words: Vec<String> = WORDS
        .lines()
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    words.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let held = words.split_off(words.len().saturating_sub(held_out));
    (words, held)
}

/// Task A examples over `words`: every word in all three games, shuffled by `seed`.
pub fn task_a(words: &[String], seed: u64) -> Vec<Example> {
    let mut v: Vec<Example> = words
        .iter()
        .flat_map(|w| [Game::Repeat, Game::Reverse, Game::Shout].map(|g| g.example(w)))
        .collect();
    v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    v
}

/// Task B examples over `words`.
pub fn task_b(words: &[String]) -> Vec<Example> {
    words.iter().map(|w| Game::SayAgain.example(w)).collect()
}

/// Writes examples as `{"prompt": ..., "completion": ...}` JSONL text.
pub fn to_jsonl(examples: &[Example]) -> String {
    examples
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn games_read_like_text() {
        assert_eq!(
            Game::Reverse.example("walrus").prompt,
            "Reverse the word: walrus ->"
        );
        assert_eq!(Game::Reverse.example("walrus").completion, " surlaw\n");
        assert_eq!(Game::Shout.example("zoo").completion, " ZOO\n");
        assert_eq!(
            Game::SayAgain.example("walrus").prompt,
            "Say it again: walrus ->"
        );
        assert_eq!(Game::SayAgain.example("walrus").completion, " walrus\n");
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let (a, b) = split_words(0, 200);
        assert_eq!(b.len(), 200);
        assert_eq!(split_words(0, 200), (a.clone(), b.clone()));
        assert!(b.iter().all(|w| !a.contains(w)));
        assert_eq!(a.len() + b.len(), WORDS.lines().count());
    }
}
